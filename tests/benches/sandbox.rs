//! Sandbox benchmark: each example unit in the sandbox against the same Rust code compiled
//! natively, on one core, and the fixed cost of a no-op unit with a warm cache.
//!
//! `cargo bench -p integration-tests --bench sandbox` (add `-- --quick` for fewer repetitions,
//! `-- --kernel NAME` for one kernel and no fixed-cost table, `-- --fixed` for the fixed-cost
//! table alone).
//! Prints medians; ratios are native time / sandbox time, so 1.00 means native speed.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator_free::sandbox::{
    Executor, ExecutorBusy, HostedModule, Limits, Metering, PreparedModule, Sandbox, SandboxConfig,
    UnitHost, UnitHostCommand, UnitRequest,
};
use example_artifacts as artifacts;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// (steal, total) jiffies over all CPUs from `/proc/stat`, where the kernel reports them: steal
/// is time the VM's host ran something else while this machine wanted the CPU.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map_while(|f| f.parse().ok())
        .collect();
    Some((*fields.get(7)?, fields.iter().take(8).sum()))
}

fn print_steal(before: Option<(u64, u64)>) {
    if let (Some((s0, t0)), Some((s1, t1))) = (before, cpu_jiffies()) {
        let share = (s1 - s0) as f64 / (t1 - t0).max(1) as f64 * 100.0;
        println!("# CPU time stolen by the VM's host during the table: {share:.1} %");
    }
}

fn median_f64(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Runs every variant once as a warm-up, then `rounds` rounds of every variant in turn; returns
/// each round's times, one per variant.
fn interleaved(rounds: usize, variants: &mut [Box<dyn FnMut() + '_>]) -> Vec<Vec<Duration>> {
    variants.iter_mut().for_each(|f| f());
    (0..rounds)
        .map(|_| {
            variants
                .iter_mut()
                .map(|f| {
                    let t = Instant::now();
                    f();
                    t.elapsed()
                })
                .collect()
        })
        .collect()
}

fn time(reps: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm-up
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

/// The native build of a kernel: JSON input bytes to JSON output bytes, as the unit does.
type NativeKernel = Box<dyn Fn(&[u8]) -> Vec<u8>>;

struct Kernel {
    name: &'static str,
    kind: &'static str,
    wasm: &'static [u8],
    input: String,
    native: NativeKernel,
}

fn native<I: serde::de::DeserializeOwned + 'static, O: serde::Serialize + 'static>(
    f: fn(&I) -> O,
) -> NativeKernel {
    Box::new(move |bytes| {
        let input: I = serde_json::from_slice(bytes).expect("benchmark input decodes");
        serde_json::to_vec(&f(&input)).expect("output encodes")
    })
}

fn sandbox(canonicalize_nans: bool, epoch_deadlines: bool, keep_resident_bytes: usize) -> Sandbox {
    Sandbox::new(SandboxConfig {
        max_concurrent_units: 2,
        canonicalize_nans,
        epoch_deadlines,
        keep_resident_bytes,
        ..SandboxConfig::default()
    })
    .expect("sandbox starts")
}

fn run_unit(
    sandbox: &Sandbox,
    module: &PreparedModule,
    input: &[u8],
    fuel: Option<u64>,
) -> Vec<u8> {
    let mut request = UnitRequest::new(input.to_vec());
    request.limits = Limits {
        timeout: Duration::from_secs(600),
        fuel,
        ..Limits::default()
    };
    match sandbox.run(module, request).result {
        Ok(out) => out,
        Err(e) => panic!("benchmark unit failed: {e}"),
    }
}

fn main() {
    // The benchmark is its own unit host: started again with this flag, it serves units.
    if std::env::args().any(|a| a == "--unit-host") {
        coordinator_free::sandbox::serve_unit_host(SandboxConfig::default()).expect("unit host");
        return;
    }
    let host_command = UnitHostCommand {
        program: std::env::current_exe().expect("own path"),
        args: vec!["--unit-host".into()],
    };
    let mut host = UnitHost::new(host_command.clone());
    let quick = std::env::args().any(|a| a == "--quick");
    let reps = if quick { 3 } else { 9 };
    // The main thread's stack (8 MiB) has room for the wasm stack and host frames.
    let kernels = vec![
        Kernel {
            name: "pi",
            kind: "integer",
            wasm: artifacts::PI_BYTES,
            input: r#"{"samples":20000000,"seed":42}"#.into(),
            native: native(example_pi::compute),
        },
        Kernel {
            name: "primes",
            kind: "integer",
            wasm: artifacts::PRIMES_BYTES,
            input: r#"{"start":1000000000,"end":1150000000}"#.into(),
            native: native(example_primes::compute),
        },
        Kernel {
            name: "mandelbrot",
            kind: "float",
            wasm: artifacts::MANDELBROT_BYTES,
            input: r#"{"x0":-2.0,"y0":-1.25,"x1":0.5,"y1":1.25,"width":400,"height":400,"max_iter":1000}"#.into(),
            native: native(example_mandelbrot::compute),
        },
        Kernel {
            name: "sir",
            kind: "float",
            wasm: artifacts::SIR_BYTES,
            input: r#"{"beta":0.3,"gamma":0.1,"population":1000000.0,"initial_infected":10.0,"days":3650,"steps_per_day":500}"#.into(),
            native: native(example_sir::compute),
        },
    ];

    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--kernel")
        .and_then(|i| args.get(i + 1).cloned());
    let fixed_only = args.iter().any(|a| a == "--fixed");
    let kernels: Vec<Kernel> = kernels
        .into_iter()
        .filter(|k| !fixed_only && only.as_deref().is_none_or(|name| name == k.name))
        .collect();

    let resident = SandboxConfig::default().keep_resident_bytes;
    // The profile as shipped: canonical NaNs and epoch deadline checks.
    let canonical = sandbox(true, true, resident);
    if !fixed_only {
        // Without the deadline checks (what a unit host process killed on timeout can run).
        let unchecked = sandbox(true, false, resident);
        // Without deadline checks and without NaN canonicalisation: the engine's raw speed.
        let raw_engine = sandbox(false, false, resident);
        println!(
            "# sandbox vs native, one core, median of {reps} interleaved rounds; ratio = median of per-round native time / time"
        );
        println!(
            "{:<11} {:<8} {:>9} | {:>9} {:>6} | {:>9} {:>6} | {:>9} {:>6} | {:>9} {:>6} | {:>9} {:>6}",
            "kernel",
            "kind",
            "native",
            "profile",
            "ratio",
            "+fuel",
            "ratio",
            "no epoch",
            "ratio",
            "raw",
            "ratio",
            "unit host",
            "ratio"
        );
        let jiffies = cpu_jiffies();
        for k in &kernels {
            let input = k.input.as_bytes();
            let expected = (k.native)(input);
            let plain = canonical.prepare(k.wasm, Metering::Off).expect("prepares");
            let fueled = canonical.prepare(k.wasm, Metering::Fuel).expect("prepares");
            let no_epoch = unchecked.prepare(k.wasm, Metering::Off).expect("prepares");
            let raw = raw_engine.prepare(k.wasm, Metering::Off).expect("prepares");
            assert_eq!(
                run_unit(&canonical, &plain, input, None),
                expected,
                "{}",
                k.name
            );
            assert_eq!(
                run_unit(&unchecked, &no_epoch, input, None),
                expected,
                "{}",
                k.name
            );

            let hosted = HostedModule::new(k.wasm.to_vec(), Metering::Off);
            let host_request = || {
                let mut r = UnitRequest::new(input.to_vec());
                r.limits.timeout = Duration::from_secs(600);
                r
            };
            assert_eq!(
                host.run(&hosted, host_request()).result,
                Ok(expected.clone())
            );
            // Interleaved rounds: each round runs every variant once, so a slow spell of a shared
            // machine lands on all columns alike; a ratio is the median of its per-round ratios.
            let mut variants: Vec<Box<dyn FnMut() + '_>> = vec![
                Box::new(|| {
                    black_box((k.native)(black_box(input)));
                }),
                Box::new(|| {
                    black_box(run_unit(&canonical, &plain, input, None));
                }),
                Box::new(|| {
                    black_box(run_unit(&canonical, &fueled, input, Some(u64::MAX / 2)));
                }),
                Box::new(|| {
                    black_box(run_unit(&unchecked, &no_epoch, input, None));
                }),
                Box::new(|| {
                    black_box(run_unit(&raw_engine, &raw, input, None));
                }),
                Box::new(|| {
                    black_box(host.run(&hosted, host_request()));
                }),
            ];
            let rounds = interleaved(reps, &mut variants);
            drop(variants);
            let t = |v: usize| median(rounds.iter().map(|r| r[v]).collect());
            let ratio = |v: usize| {
                median_f64(
                    rounds
                        .iter()
                        .map(|r| r[0].as_secs_f64() / r[v].as_secs_f64())
                        .collect(),
                )
            };
            let (t_native, t_profile, t_fuel, t_no_epoch, t_raw, t_host) =
                (t(0), t(1), t(2), t(3), t(4), t(5));
            let ms = |t: Duration| t.as_secs_f64() * 1e3;
            println!(
                "{:<11} {:<8} {:>7.1}ms | {:>7.1}ms {:>5.2}x | {:>7.1}ms {:>5.2}x | {:>7.1}ms {:>5.2}x | {:>7.1}ms {:>5.2}x | {:>7.1}ms {:>5.2}x",
                k.name,
                k.kind,
                ms(t_native),
                ms(t_profile),
                ratio(1),
                ms(t_fuel),
                ratio(2),
                ms(t_no_epoch),
                ratio(3),
                ms(t_raw),
                ratio(4),
                ms(t_host),
                ratio(5),
            );
        }
        print_steal(jiffies);
    }

    if only.is_some() && !fixed_only {
        return;
    }
    println!();
    println!(
        "# fixed cost per unit with a warm cache (instantiate, run, collect), median of batches"
    );
    let noop_wasm = coordinator_free::sandbox::module_from_file_bytes(artifacts::NOOP_WAT_BYTES)
        .expect("no-op converts")
        .into_owned();
    let batch = if quick { 2_000 } else { 10_000 };
    let batches = if quick { 3 } else { 9 };
    let per_unit = |f: &mut dyn FnMut()| {
        let total = time(batches, || {
            for _ in 0..batch {
                f();
            }
        });
        total.as_secs_f64() * 1e6 / batch as f64
    };
    let noop = canonical
        .prepare(&noop_wasm, Metering::Off)
        .expect("prepares");
    let echo = canonical
        .prepare(artifacts::ECHO_BYTES, Metering::Off)
        .expect("prepares");
    let unmapping = sandbox(true, true, 0);
    let echo_unmapping = unmapping
        .prepare(artifacts::ECHO_BYTES, Metering::Off)
        .expect("prepares");
    let input: Arc<[u8]> = Arc::from(&b"{}"[..]);
    let request = |input: &Arc<[u8]>| UnitRequest::new(input.clone());
    let t_prepare = per_unit(&mut || {
        black_box(
            canonical
                .prepare(&noop_wasm, Metering::Off)
                .expect("cached"),
        );
    });
    let t_noop = per_unit(&mut || {
        black_box(canonical.run(&noop, request(&input)));
    });
    let t_echo = per_unit(&mut || {
        black_box(canonical.run(&echo, request(&input)));
    });
    let t_echo_unmapping = per_unit(&mut || {
        black_box(unmapping.run(&echo_unmapping, request(&input)));
    });
    let executor = Executor::new(canonical.clone(), 1, 4).expect("executor starts");
    let t_executor = per_unit(&mut || {
        black_box(executor.run(noop.clone(), request(&input)));
    });
    let hosted_noop = Arc::new(HostedModule::new(noop_wasm.clone(), Metering::Off));
    let t_host = per_unit(&mut || {
        black_box(host.run(&hosted_noop, request(&input)));
    });
    // Through the executor and a unit host, as jobs run units: one at a time (every unit
    // waits for the one before), then with the queue kept full, where a unit thread hands its
    // host the queued units in batches.
    let queue_depth = 256;
    let pool = Executor::unit_hosts(&host_command, 1, queue_depth).expect("unit hosts start");
    let t_pool_one = per_unit(&mut || {
        black_box(pool.run(hosted_noop.clone(), request(&input)));
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel::<bool>();
    let t_pool_queued = {
        let mut flood = || {
            let (mut submitted, mut done) = (0, 0);
            while done < batch {
                while submitted < batch {
                    let done_tx = done_tx.clone();
                    let reply = move |r: coordinator_free::sandbox::UnitReport| {
                        let _ = done_tx.send(r.result.is_ok());
                    };
                    match pool.try_submit(hosted_noop.clone(), request(&input), reply) {
                        Ok(()) => submitted += 1,
                        Err(ExecutorBusy) => break,
                    }
                }
                assert!(done_rx.recv().expect("a report"), "no-op unit failed");
                done += 1;
                while let Ok(ok) = done_rx.try_recv() {
                    assert!(ok, "no-op unit failed");
                    done += 1;
                }
            }
        };
        time(batches, &mut flood).as_secs_f64() * 1e6 / batch as f64
    };
    let line = |what: &str, us: f64| println!("{what:<56} {us:>8.2} us");
    line("cache lookup (hash + map) of the no-op module", t_prepare);
    line("no-op unit (WAT, no imports), calling thread", t_noop);
    line("echo unit (task-sdk bytes unit), calling thread", t_echo);
    line(
        "echo unit, linear memory unmapped between units",
        t_echo_unmapping,
    );
    line(
        "no-op unit through the executor (thread hand-off)",
        t_executor,
    );
    line(
        "no-op unit in a unit host process (pipe round trip)",
        t_host,
    );
    line(
        "no-op unit, executor + unit host, one at a time",
        t_pool_one,
    );
    line(
        "no-op units, executor + unit host, queue kept full",
        t_pool_queued,
    );
}
