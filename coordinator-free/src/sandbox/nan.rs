//! NaN canonicalisation where NaN bits become observable, instead of after every float
//! instruction.
//!
//! The only float behaviour WebAssembly leaves to the machine is the bit pattern of a NaN that
//! an arithmetic instruction produces: x86 and Arm differ in its sign and payload. Redundant
//! validation needs every honest peer to produce identical bytes, so those bits must not reach
//! anything a unit can observe. Cranelift's own option canonicalises the result of every float
//! instruction, which costs 2.6–2.8× on float kernels (`BENCHMARKS.md`). Most float values never
//! become bits at all: they flow from one arithmetic instruction to the next through locals and
//! the operand stack, and only a few instructions can expose a NaN's bits. This pass rewrites a
//! module so that a value that may be a machine-dependent NaN is made the canonical NaN right
//! before such an instruction, and is left alone everywhere else.
//!
//! Each `f32`/`f64` value is classified by where it came from:
//!
//! * *neutral*: never a NaN (a non-NaN constant, a conversion from an integer, a zeroed local);
//! * *clean*: its bits are the same on every machine (loaded from memory, reinterpreted from an
//!   integer, a NaN constant, a call's result, a global) — a NaN with a payload stays as it is,
//!   as the specification requires of loads, stores, locals and calls;
//! * *tainted*: it may be a NaN an arithmetic instruction made (`add`, `sqrt`, `min`,
//!   `promote`, …), or was moved from one.
//!
//! A tainted value is canonicalised before every instruction that exposes its bits or hands it
//! on to code that assumes clean values: `store`, `reinterpret`, `abs`/`neg`/`copysign` (bit
//! operations), a splat or lane replacement into a vector, `global.set`, call arguments and
//! returned values, values carried by branches and block boundaries, and a set of a local that
//! also holds clean values. A local whose every assignment is tainted or neutral keeps tainted
//! values unchanged, so a loop's float state stays in registers untouched. Vector float
//! arithmetic is canonicalised right after each instruction, as before: a `v128` can be read as
//! integers by any bitwise instruction, so its lanes are never left machine-dependent.
//!
//! Canonicalising a tainted value is always allowed (the specification lets an arithmetic
//! instruction return any NaN, the canonical one included); the observable result equals a run
//! in which every float instruction canonicalised its NaN result.

use std::collections::HashMap;

use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    CodeSection, CustomSection, Encode, Function, Ieee32, Ieee64, Instruction, RawSection,
};
use wasmtime::wasmparser::{
    self, FuncValidatorAllocations, FunctionBody, Operator, Parser, Payload, ValType, ValidPayload,
    Validator, WasmFeatures,
};

/// The canonical NaNs: positive, quiet, no payload.
const CANONICAL_F32: u32 = 0x7fc0_0000;
const CANONICAL_F64: u64 = 0x7ff8_0000_0000_0000;

/// Passes of the local classification before it gives up and treats every float local as
/// clean (always correct, only slower); a real module settles in two or three.
const MAX_PASSES: usize = 16;

/// Instructions of one function the analysis keeps track of. A longer function (only a
/// generated or hostile one gets there) is rewritten the simple way instead — every float
/// arithmetic result canonicalised on the spot — so memory stays bounded whatever the module.
const MAX_TRACKED_OPS: usize = 1 << 18;

/// Why a module could not be rewritten: it is not a valid module under the sandbox's features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RewriteError(pub(crate) String);

/// `wasm` with every machine-dependent NaN canonicalised before it can be observed.
pub(crate) fn canonicalize_observable_nans(
    wasm: &[u8],
    features: WasmFeatures,
) -> Result<Vec<u8>, RewriteError> {
    let err = |e: wasmparser::BinaryReaderError| RewriteError(format!("{e}"));
    let mut validator = Validator::new_with_features(features);
    let mut out = wasm_encoder::Module::new();
    let mut code: Option<CodeSection> = None;
    let mut allocs = FuncValidatorAllocations::default();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(err)?;
        let valid = validator.payload(&payload).map_err(err)?;
        match &payload {
            Payload::CodeSectionStart { .. } => code = Some(CodeSection::new()),
            Payload::CodeSectionEntry(body) => {
                let ValidPayload::Func(func, _) = valid else {
                    return Err(RewriteError("a function body without a validator".into()));
                };
                let mut fv = func.into_validator(std::mem::take(&mut allocs));
                let function = rewrite_function(&mut fv, body)?;
                allocs = fv.into_allocations();
                let section = code.as_mut().ok_or_else(|| {
                    RewriteError("a function body outside the code section".into())
                })?;
                section.function(&function);
            }
            Payload::CustomSection(c) => {
                flush_code(&mut out, &mut code);
                out.section(&CustomSection {
                    name: c.name().into(),
                    data: c.data().into(),
                });
            }
            Payload::End(_) => flush_code(&mut out, &mut code),
            other => {
                if let Some((id, range)) = other.as_section() {
                    flush_code(&mut out, &mut code);
                    let data = wasm
                        .get(range)
                        .ok_or_else(|| RewriteError("a section past the end".into()))?;
                    out.section(&RawSection { id, data });
                }
            }
        }
    }
    Ok(out.finish())
}

/// Writes the code section once its last body has been rewritten (the next section, or the
/// end of the module, says so).
fn flush_code(out: &mut wasm_encoder::Module, code: &mut Option<CodeSection>) {
    if let Some(section) = code.take() {
        out.section(&section);
    }
}

/// Where a float value came from; ordered so that joining two is their maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Taint {
    /// Never a NaN.
    Neutral,
    /// Bits identical on every machine.
    Clean,
    /// Possibly a NaN whose bits depend on the machine.
    Tainted,
}

/// What a local of float type holds, settled before the body is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LocalKind {
    /// Only tainted or neutral values: reading it gives a tainted value, setting it needs
    /// nothing.
    Tainted,
    /// Clean values (a parameter, or any clean assignment): tainted values are canonicalised
    /// on the way in.
    Clean,
}

/// What validation said about one instruction, kept for the passes that follow.
struct Step {
    /// Types of the operands it takes, deepest first (`None` in unreachable code).
    ins: Vec<Option<ValType>>,
    /// Types of the values it leaves.
    outs: Vec<Option<ValType>>,
    /// The operand stack's height after it.
    height_after: usize,
    /// Whether it is in unreachable code, where nothing is rewritten.
    dead: bool,
}

fn is_float(ty: Option<ValType>) -> bool {
    matches!(ty, Some(ValType::F32 | ValType::F64))
}

fn rewrite_function(
    fv: &mut wasmparser::FuncValidator<wasmparser::ValidatorResources>,
    body: &FunctionBody<'_>,
) -> Result<Function, RewriteError> {
    let err = |e: wasmparser::BinaryReaderError| RewriteError(format!("{e}"));
    let mut locals = Vec::new();
    let mut reader = body.get_locals_reader().map_err(err)?;
    for _ in 0..reader.get_count() {
        let offset = reader.original_position();
        let (count, ty) = reader.read().map_err(err)?;
        fv.define_locals(offset, count, ty).map_err(err)?;
        locals.push((count, ty));
    }
    let params = fv.len_locals() - locals.iter().map(|(n, _)| n).sum::<u32>();
    let local_types: Vec<ValType> = (0..fv.len_locals())
        .map(|i| fv.get_local_type(i).unwrap_or(ValType::I32))
        .collect();

    let mut steps = Vec::new();
    let mut tracked = true;
    let mut ops = body.get_operators_reader().map_err(err)?;
    while !ops.eof() {
        let offset = ops.original_position();
        let op = ops.read().map_err(err)?;
        let (pops, pushes) = op.operator_arity(&*fv).ok_or_else(|| {
            RewriteError(format!(
                "an instruction of unknown arity at offset {offset}"
            ))
        })?;
        let dead = fv.get_control_frame(0).is_none_or(|f| f.unreachable);
        let ins = if tracked {
            (0..pops as usize)
                .rev()
                .map(|d| fv.get_operand_type(d).flatten())
                .collect()
        } else {
            Vec::new()
        };
        fv.op(offset, &op).map_err(err)?;
        if !tracked {
            continue;
        }
        if steps.len() == MAX_TRACKED_OPS {
            tracked = false;
            steps = Vec::new();
            continue;
        }
        let outs = (0..pushes as usize)
            .rev()
            .map(|d| fv.get_operand_type(d).flatten())
            .collect();
        steps.push(Step {
            ins,
            outs,
            height_after: fv.operand_stack_height() as usize,
            dead,
        });
    }
    ops.finish().map_err(err)?;

    let mut emitter = Emitter {
        next_local: local_types.len() as u32,
        extra: Vec::new(),
        pooled: HashMap::new(),
        code: Vec::new(),
    };
    if tracked {
        let kinds = classify_locals(&steps, body, params, local_types.len())?;
        simulate(&steps, body, &kinds, Some(&mut emitter))?;
    } else {
        canonicalize_every_result(body, &mut emitter)?;
    }
    let mut all_locals: Vec<(u32, wasm_encoder::ValType)> = Vec::new();
    let mut re = RoundtripReencoder;
    for (count, ty) in locals
        .into_iter()
        .chain(emitter.extra.iter().map(|&ty| (1, ty)))
    {
        let ty = re.val_type(ty).map_err(|e| RewriteError(format!("{e}")))?;
        all_locals.push((count, ty));
    }
    let mut function = Function::new(all_locals);
    function.raw(emitter.code);
    Ok(function)
}

/// Settles what each local holds. Every float local starts as tainted-only; one that receives
/// a clean value becomes clean, which can make others clean in turn. Parameters hold the
/// caller's clean values.
fn classify_locals(
    steps: &[Step],
    body: &FunctionBody<'_>,
    params: u32,
    count: usize,
) -> Result<Vec<LocalKind>, RewriteError> {
    let mut kinds: Vec<LocalKind> = (0..count as u32)
        .map(|i| {
            if i < params {
                LocalKind::Clean
            } else {
                LocalKind::Tainted
            }
        })
        .collect();
    for _ in 0..MAX_PASSES {
        let clean_sets = simulate(steps, body, &kinds, None)?;
        let mut changed = false;
        for (i, kind) in kinds.iter_mut().enumerate() {
            if *kind == LocalKind::Tainted && clean_sets.get(i).copied().unwrap_or(false) {
                *kind = LocalKind::Clean;
                changed = true;
            }
        }
        if !changed {
            return Ok(kinds);
        }
    }
    Ok(vec![LocalKind::Clean; count])
}

/// The simple rewrite for functions too long to analyse: every float arithmetic result is made
/// canonical at once, so every value is clean and nothing else needs a change.
fn canonicalize_every_result(body: &FunctionBody<'_>, e: &mut Emitter) -> Result<(), RewriteError> {
    let err = |e: wasmparser::BinaryReaderError| RewriteError(format!("{e}"));
    let mut ops = body.get_operators_reader().map_err(err)?;
    while !ops.eof() {
        let op = ops.read().map_err(err)?;
        e.push_op(&op)?;
        if let Some(ty) = scalar_arithmetic(&op) {
            e.canonical_top(ty);
        } else if let Some(f64_lanes) = vector_arithmetic(&op) {
            e.canonical_vector(f64_lanes);
        }
    }
    Ok(())
}

/// Collects the rewritten body (encoded) and the extra locals it needs.
struct Emitter {
    next_local: u32,
    extra: Vec<ValType>,
    /// Extra locals by type and role: `Some(n)` holds the operand spilled `n` places above the
    /// canonicalised one, `None` is the scratch local for canonicalising the top of the stack.
    pooled: HashMap<(ValType, Option<usize>), u32>,
    code: Vec<u8>,
}

impl Emitter {
    fn push(&mut self, instruction: Instruction<'_>) {
        instruction.encode(&mut self.code);
    }

    fn push_op(&mut self, op: &Operator<'_>) -> Result<(), RewriteError> {
        let instruction = RoundtripReencoder
            .instruction(op.clone())
            .map_err(|e| RewriteError(format!("{e}")))?;
        self.push(instruction);
        Ok(())
    }

    /// The extra local of type `ty` for `role` (see [`Emitter::pooled`]), added on first use.
    fn local(&mut self, ty: ValType, role: Option<usize>) -> u32 {
        *self.pooled.entry((ty, role)).or_insert_with(|| {
            let index = self.next_local;
            self.next_local += 1;
            self.extra.push(ty);
            index
        })
    }

    /// Replaces the scalar held in local `l` by the canonical NaN if it is a NaN, leaving the
    /// result on the stack: `select(x, nan, x == x)`.
    fn canonical_from_local(&mut self, ty: ValType, l: u32) {
        self.push(Instruction::LocalGet(l));
        self.push(match ty {
            ValType::F32 => Instruction::F32Const(Ieee32::new(CANONICAL_F32)),
            _ => Instruction::F64Const(Ieee64::new(CANONICAL_F64)),
        });
        self.push(Instruction::LocalGet(l));
        self.push(Instruction::LocalGet(l));
        self.push(match ty {
            ValType::F32 => Instruction::F32Eq,
            _ => Instruction::F64Eq,
        });
        self.push(Instruction::Select);
    }

    /// Canonicalises the scalar on top of the stack.
    fn canonical_top(&mut self, ty: ValType) {
        let l = self.local(ty, None);
        self.push(Instruction::LocalSet(l));
        self.canonical_from_local(ty, l);
    }

    /// Canonicalises every lane of the vector on top of the stack, read as `f32x4` or `f64x2`:
    /// `bitselect(v, nans, v == v)`.
    fn canonical_vector(&mut self, f64_lanes: bool) {
        let l = self.local(ValType::V128, None);
        let nans = if f64_lanes {
            (i128::from(CANONICAL_F64) << 64) | i128::from(CANONICAL_F64)
        } else {
            let lane = i128::from(CANONICAL_F32);
            lane | (lane << 32) | (lane << 64) | (lane << 96)
        };
        self.push(Instruction::LocalTee(l));
        self.push(Instruction::V128Const(nans));
        self.push(Instruction::LocalGet(l));
        self.push(Instruction::LocalGet(l));
        self.push(if f64_lanes {
            Instruction::F64x2Eq
        } else {
            Instruction::F32x4Eq
        });
        self.push(Instruction::V128Bitselect);
    }

    /// Canonicalises the operands `ins[i]` for every `i` in `which` (the operands of the next
    /// instruction, deepest first), spilling the ones above the deepest into locals.
    fn canonical_operands(&mut self, ins: &[Option<ValType>], which: &[usize]) -> bool {
        let Some(&deepest) = which.iter().min() else {
            return true;
        };
        let mut above = Vec::new();
        for ty in &ins[deepest + 1..] {
            match ty {
                Some(ty) => above.push(*ty),
                None => return false,
            }
        }
        let Some(deepest_ty) = ins[deepest] else {
            return false;
        };
        let spilled: Vec<u32> = above
            .iter()
            .enumerate()
            .map(|(slot, &ty)| self.local(ty, Some(slot)))
            .collect();
        for &l in spilled.iter().rev() {
            self.push(Instruction::LocalSet(l));
        }
        self.canonical_top(deepest_ty);
        for (slot, (&ty, &l)) in above.iter().zip(&spilled).enumerate() {
            if which.contains(&(deepest + 1 + slot)) {
                self.canonical_from_local(ty, l);
            } else {
                self.push(Instruction::LocalGet(l));
            }
        }
        true
    }
}

/// A constant is clean when it is a NaN (its bits are the module's own) and never NaN otherwise.
fn constant(is_nan: bool) -> Taint {
    if is_nan { Taint::Clean } else { Taint::Neutral }
}

/// Arithmetic whose NaN result depends on the machine, with the type of that result.
fn scalar_arithmetic(op: &Operator<'_>) -> Option<ValType> {
    use Operator as O;
    match op {
        O::F32Add
        | O::F32Sub
        | O::F32Mul
        | O::F32Div
        | O::F32Min
        | O::F32Max
        | O::F32Sqrt
        | O::F32Ceil
        | O::F32Floor
        | O::F32Trunc
        | O::F32Nearest
        | O::F32DemoteF64 => Some(ValType::F32),
        O::F64Add
        | O::F64Sub
        | O::F64Mul
        | O::F64Div
        | O::F64Min
        | O::F64Max
        | O::F64Sqrt
        | O::F64Ceil
        | O::F64Floor
        | O::F64Trunc
        | O::F64Nearest
        | O::F64PromoteF32 => Some(ValType::F64),
        _ => None,
    }
}

/// Vector arithmetic whose NaN lanes depend on the machine: `Some(true)` for `f64x2` lanes,
/// `Some(false)` for `f32x4`.
fn vector_arithmetic(op: &Operator<'_>) -> Option<bool> {
    use Operator as O;
    match op {
        O::F32x4Add
        | O::F32x4Sub
        | O::F32x4Mul
        | O::F32x4Div
        | O::F32x4Min
        | O::F32x4Max
        | O::F32x4Sqrt
        | O::F32x4Ceil
        | O::F32x4Floor
        | O::F32x4Trunc
        | O::F32x4Nearest
        | O::F32x4DemoteF64x2Zero => Some(false),
        O::F64x2Add
        | O::F64x2Sub
        | O::F64x2Mul
        | O::F64x2Div
        | O::F64x2Min
        | O::F64x2Max
        | O::F64x2Sqrt
        | O::F64x2Ceil
        | O::F64x2Floor
        | O::F64x2Trunc
        | O::F64x2Nearest
        | O::F64x2PromoteLowF32x4 => Some(true),
        _ => None,
    }
}

/// Instructions that expose or hand on every float operand they take: each tainted one is
/// canonicalised first.
fn exposes_operands(op: &Operator<'_>) -> bool {
    use Operator as O;
    matches!(
        op,
        O::F32Store { .. }
            | O::F64Store { .. }
            | O::I32ReinterpretF32
            | O::I64ReinterpretF64
            | O::F32Abs
            | O::F32Neg
            | O::F32Copysign
            | O::F64Abs
            | O::F64Neg
            | O::F64Copysign
            | O::F32x4Splat
            | O::F64x2Splat
            | O::F32x4ReplaceLane { .. }
            | O::F64x2ReplaceLane { .. }
            | O::GlobalSet { .. }
            | O::Call { .. }
            | O::CallIndirect { .. }
            | O::ReturnCall { .. }
            | O::ReturnCallIndirect { .. }
            | O::CallRef { .. }
            | O::ReturnCallRef { .. }
            | O::Return
            | O::Br { .. }
            | O::BrIf { .. }
            | O::BrTable { .. }
            | O::Block { .. }
            | O::Loop { .. }
            | O::If { .. }
            | O::Else
            | O::End
    )
}

/// Runs the classification over a function's instructions. Without an emitter it only reports,
/// per local, whether some assignment gives it a clean value; with one it also writes the
/// rewritten body.
fn simulate(
    steps: &[Step],
    body: &FunctionBody<'_>,
    kinds: &[LocalKind],
    mut emit: Option<&mut Emitter>,
) -> Result<Vec<bool>, RewriteError> {
    use Operator as O;
    let mut ops = body
        .get_operators_reader()
        .map_err(|e| RewriteError(format!("{e}")))?;
    let mut clean_sets = vec![false; kinds.len()];
    let mut stack: Vec<Taint> = Vec::new();
    let local_taint = |l: u32| match kinds.get(l as usize) {
        Some(LocalKind::Tainted) => Taint::Tainted,
        _ => Taint::Clean,
    };
    for step in steps {
        let op = ops.read().map_err(|e| RewriteError(format!("{e}")))?;
        let mut ins: Vec<Taint> = (0..step.ins.len())
            .map(|_| stack.pop().unwrap_or(Taint::Tainted))
            .collect();
        ins.reverse();

        // Which operands to canonicalise before the instruction.
        let mut which: Vec<usize> = Vec::new();
        let tainted_float =
            |i: usize| ins[i] == Taint::Tainted && is_float(step.ins.get(i).copied().flatten());
        if exposes_operands(&op) {
            which.extend((0..ins.len()).filter(|&i| tainted_float(i)));
        } else {
            match &op {
                O::LocalSet { local_index } | O::LocalTee { local_index } => {
                    if ins.first() == Some(&Taint::Clean)
                        && let Some(seen) = clean_sets.get_mut(*local_index as usize)
                    {
                        *seen = true;
                    }
                    if local_taint(*local_index) == Taint::Clean && tainted_float(0) {
                        which.push(0);
                    }
                }
                O::Select | O::TypedSelect { .. } if ins.len() == 3 => {
                    // A clean value and a tainted one meeting: the tainted one is made clean,
                    // so the result never mixes the two.
                    let other_clean = |i: usize| ins[1 - i] == Taint::Clean;
                    which.extend((0..2).filter(|&i| tainted_float(i) && other_clean(i)));
                }
                _ => {}
            }
        }
        let mut rewrote = true;
        if let Some(e) = emit.as_deref_mut() {
            if !step.dead && !which.is_empty() {
                rewrote = e.canonical_operands(&step.ins, &which);
            }
            e.push_op(&op)?;
            if !step.dead
                && let Some(f64_lanes) = vector_arithmetic(&op)
            {
                e.canonical_vector(f64_lanes);
            }
        }
        if rewrote && !step.dead {
            for &i in &which {
                ins[i] = Taint::Clean;
            }
        }

        // What the instruction leaves.
        let outs: Vec<Taint> = step
            .outs
            .iter()
            .enumerate()
            .map(|(i, ty)| {
                if !is_float(*ty) {
                    return Taint::Neutral;
                }
                match &op {
                    op if scalar_arithmetic(op).is_some() => Taint::Tainted,
                    O::F32Const { value } => constant(f32::from_bits(value.bits()).is_nan()),
                    O::F64Const { value } => constant(f64::from_bits(value.bits()).is_nan()),
                    O::F32ConvertI32S
                    | O::F32ConvertI32U
                    | O::F32ConvertI64S
                    | O::F32ConvertI64U
                    | O::F64ConvertI32S
                    | O::F64ConvertI32U
                    | O::F64ConvertI64S
                    | O::F64ConvertI64U => Taint::Neutral,
                    O::F32Load { .. }
                    | O::F64Load { .. }
                    | O::F32ReinterpretI32
                    | O::F64ReinterpretI64
                    | O::F32x4ExtractLane { .. }
                    | O::F64x2ExtractLane { .. }
                    | O::GlobalGet { .. }
                    | O::Call { .. }
                    | O::CallIndirect { .. }
                    | O::CallRef { .. } => Taint::Clean,
                    O::LocalGet { local_index } => local_taint(*local_index),
                    O::LocalTee { local_index } => match local_taint(*local_index) {
                        Taint::Tainted => ins.first().copied().unwrap_or(Taint::Tainted),
                        _ => ins
                            .first()
                            .copied()
                            .unwrap_or(Taint::Tainted)
                            .min(Taint::Clean),
                    },
                    // Bit operations on canonicalised or clean operands: the magnitude's kind.
                    O::F32Abs
                    | O::F32Neg
                    | O::F64Abs
                    | O::F64Neg
                    | O::F32Copysign
                    | O::F64Copysign => ins.first().copied().unwrap_or(Taint::Tainted),
                    O::Select | O::TypedSelect { .. } if ins.len() == 3 => ins[0].max(ins[1]),
                    // Values carried across a block boundary were canonicalised on the way.
                    O::Block { .. } | O::Loop { .. } | O::If { .. } | O::End | O::BrIf { .. } => {
                        ins.get(i)
                            .copied()
                            .unwrap_or(Taint::Clean)
                            .min(Taint::Clean)
                    }
                    // The `if`'s parameters again, canonicalised when it began.
                    O::Else => Taint::Clean,
                    _ => Taint::Tainted,
                }
            })
            .collect();
        stack.extend(outs);
        stack.resize(step.height_after, Taint::Tainted);
    }
    Ok(clean_sets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> WasmFeatures {
        WasmFeatures::default()
    }

    fn rewrite(wat: &str) -> Vec<u8> {
        let wasm = wat::parse_str(wat).expect("valid text");
        let out = canonicalize_observable_nans(&wasm, features()).expect("rewrites");
        Validator::new_with_features(features())
            .validate_all(&out)
            .expect("the rewritten module validates");
        out
    }

    /// How many instructions of the rewritten module `pick` matches.
    fn count(wasm: &[u8], pick: fn(&Operator<'_>) -> bool) -> usize {
        let mut count = 0;
        for payload in Parser::new(0).parse_all(wasm) {
            if let Ok(Payload::CodeSectionEntry(body)) = payload {
                let mut ops = body.get_operators_reader().expect("operators");
                while !ops.eof() {
                    if pick(&ops.read().expect("operator")) {
                        count += 1;
                    }
                }
            }
        }
        count
    }

    fn selects(wasm: &[u8]) -> usize {
        count(wasm, |op| matches!(op, Operator::Select))
    }

    #[test]
    fn arithmetic_in_locals_is_left_alone() {
        // A loop that keeps its float state in locals and only compares it: nothing to do.
        let out = rewrite(
            r#"(module (func (param i32) (result i32) (local f64 f64)
                (loop (local.set 1 (f64.add (local.get 1) (f64.mul (local.get 2) (f64.const 0.5))))
                      (local.set 2 (f64.sub (local.get 1) (f64.const 1)))
                      (br_if 0 (f64.lt (local.get 1) (f64.const 100))))
                (i32.trunc_sat_f64_s (local.get 2))))"#,
        );
        assert_eq!(selects(&out), 0);
    }

    #[test]
    fn stores_and_reinterprets_of_arithmetic_are_canonicalised() {
        let out = rewrite(
            r#"(module (memory 1) (func (param f64) (result i64)
                (f64.store (i32.const 0) (f64.div (local.get 0) (f64.const 0)))
                (i64.reinterpret_f64 (f64.sqrt (local.get 0)))))"#,
        );
        assert_eq!(selects(&out), 2);
    }

    #[test]
    fn clean_values_keep_their_bits() {
        // A loaded NaN stored again, a parameter returned, a reinterpreted constant: no change.
        let out = rewrite(
            r#"(module (memory 1) (func (param f64) (result f64)
                (f64.store (i32.const 8) (f64.load (i32.const 0)))
                (f64.store (i32.const 16) (f64.reinterpret_i64 (i64.const 0x7ff0000000000001)))
                (local.get 0)))"#,
        );
        assert_eq!(selects(&out), 0);
    }

    #[test]
    fn a_local_holding_both_kinds_is_kept_clean() {
        // Local 1 receives a loaded value and a sum: the sum is canonicalised on the way in,
        // and the store of the local then needs nothing.
        let out = rewrite(
            r#"(module (memory 1) (func (param i32) (local f64)
                (local.set 1 (f64.load (i32.const 0)))
                (if (local.get 0) (then (local.set 1 (f64.add (local.get 1) (f64.const 1)))))
                (f64.store (i32.const 8) (local.get 1))))"#,
        );
        assert_eq!(selects(&out), 1);
    }

    #[test]
    fn call_arguments_below_the_top_are_spilled() {
        // The tainted argument sits under an i32: it is reached by spilling the i32.
        let out = rewrite(
            r#"(module
                (func $f (param f32 i32) (result f32) (local.get 0))
                (func (param f32) (result f32)
                  (call $f (f32.mul (local.get 0) (local.get 0)) (i32.const 7))))"#,
        );
        // Only the argument: a call's result is clean, so returning it needs nothing.
        assert_eq!(selects(&out), 1);
    }

    #[test]
    fn vector_arithmetic_is_canonicalised_after_each_instruction() {
        let out = rewrite(
            r#"(module (func (param v128) (result v128)
                (f64x2.add (f32x4.mul (local.get 0) (local.get 0)) (local.get 0))))"#,
        );
        assert_eq!(count(&out, |op| matches!(op, Operator::V128Bitselect)), 2);
    }

    #[test]
    fn unreachable_code_and_custom_sections_survive() {
        let wasm = wat::parse_str(
            r#"(module (@custom "note" "kept") (func (result f64)
                (return (f64.const 1)) (f64.add (f64.const 2) (f64.const 3))))"#,
        )
        .expect("valid text");
        let out = canonicalize_observable_nans(&wasm, features()).expect("rewrites");
        Validator::new_with_features(features())
            .validate_all(&out)
            .expect("valid");
        let names: Vec<String> = Parser::new(0)
            .parse_all(&out)
            .filter_map(|p| match p {
                Ok(Payload::CustomSection(c)) => Some(c.name().to_owned()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["note"]);
    }

    #[test]
    fn functions_too_long_to_track_canonicalise_every_result() {
        // Past the tracking limit a dropped sum is canonicalised all the same; below it, not.
        let body = |nops: usize| {
            format!(
                "(module (func (param f64) {} (drop (f64.add (local.get 0) (local.get 0)))))",
                "nop ".repeat(nops)
            )
        };
        assert_eq!(selects(&rewrite(&body(10))), 0);
        assert_eq!(selects(&rewrite(&body(MAX_TRACKED_OPS))), 1);
    }

    proptest::proptest! {
        #[test]
        fn damaged_modules_never_panic(flips in proptest::collection::vec((0usize..4096, 0u8..=255), 1..8)) {
            let mut wasm = wat::parse_str(
                r#"(module (memory 1) (global (mut f32) (f32.const 0))
                    (func $f (param f64 i32) (result f64)
                      (if (result f64) (local.get 1)
                        (then (f64.sqrt (local.get 0)))
                        (else (f64.neg (f64.load (local.get 1))))))
                    (func (param f32) (local f64)
                      (local.set 1 (call $f (f64.promote_f32 (local.get 0)) (i32.const 8)))
                      (f64.store (i32.const 0) (f64.copysign (local.get 1) (local.get 1)))
                      (global.set 0 (f32.demote_f64 (local.get 1)))
                      (v128.store (i32.const 16) (f32x4.splat (global.get 0)))))"#,
            )
            .expect("valid text");
            for (at, byte) in flips {
                let len = wasm.len();
                wasm[at % len] ^= byte;
            }
            if let Ok(out) = canonicalize_observable_nans(&wasm, features()) {
                proptest::prop_assert!(
                    Validator::new_with_features(features()).validate_all(&out).is_ok()
                );
            }
        }
    }

    #[test]
    fn invalid_modules_are_refused_not_rewritten() {
        for bytes in [
            &b""[..],
            b"\0asm",
            b"\0asm\x01\0\0\0\x0a\x04\x01\x02\0\x6a",
            b"garbage bytes",
        ] {
            assert!(canonicalize_observable_nans(bytes, features()).is_err());
        }
        // The text parser does not type-check, so this reaches the rewrite as binary.
        let ill_typed = wat::parse_str(r#"(module (func (result f64) (i32.const 1)))"#)
            .expect("parses as text");
        assert!(canonicalize_observable_nans(&ill_typed, features()).is_err());
    }
}
