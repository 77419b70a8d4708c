;; A complete work unit written by hand against guest ABI v1 (docs/guest-abi.md), without
;; task-sdk: the output is the input with its bytes in reverse order. It logs one info line,
;; reports progress, and fails with code 7 ("empty input") when the input is empty.
(module
  (import "cf1" "input_len" (func $input_len (result i32)))
  (import "cf1" "input_read"
    (func $input_read (param $dst i32) (param $offset i32) (param $len i32) (result i32)))
  (import "cf1" "output_write" (func $output_write (param $src i32) (param $len i32)))
  (import "cf1" "log" (func $log (param $level i32) (param $src i32) (param $len i32)))
  (import "cf1" "progress" (func $progress (param $done i64) (param $total i64)))
  (import "cf1" "fail" (func $fail (param $code i32) (param $src i32) (param $len i32)))

  (memory (export "memory") 1)

  ;; Messages live below $BUF; the input is read to $BUF and reversed in place.
  (data (i32.const 0) "empty input")
  (data (i32.const 16) "reversing input")
  (data (i32.const 32) "input too large")
  (global $BUF i32 (i32.const 1024))

  (func (export "run") (result i32)
    (local $len i32)
    (local $pages i64)
    (local $lo i32)
    (local $hi i32)
    (local $byte i32)

    (local.set $len (call $input_len))
    (if (i32.eqz (local.get $len))
      (then
        (call $fail (i32.const 7) (i32.const 0) (i32.const 11))
        (unreachable)))

    ;; Pages needed for $BUF + len bytes, computed in 64 bits because len is unsigned.
    (local.set $pages
      (i64.shr_u
        (i64.add
          (i64.add (i64.extend_i32_u (global.get $BUF)) (i64.extend_i32_u (local.get $len)))
          (i64.const 65535))
        (i64.const 16)))
    (if (i64.gt_u (local.get $pages) (i64.extend_i32_u (memory.size)))
      (then
        (if (i32.eq
              (memory.grow
                (i32.wrap_i64
                  (i64.sub (local.get $pages) (i64.extend_i32_u (memory.size)))))
              (i32.const -1))
          (then
            (call $fail (i32.const 8) (i32.const 32) (i32.const 15))
            (unreachable)))))

    ;; The host copies the whole clamped range in one call.
    (drop (call $input_read (global.get $BUF) (i32.const 0) (local.get $len)))
    (call $log (i32.const 2) (i32.const 16) (i32.const 15))

    (local.set $lo (global.get $BUF))
    (local.set $hi (i32.sub (i32.add (global.get $BUF) (local.get $len)) (i32.const 1)))
    (block $done
      (loop $swap
        (br_if $done (i32.ge_u (local.get $lo) (local.get $hi)))
        (local.set $byte (i32.load8_u (local.get $lo)))
        (i32.store8 (local.get $lo) (i32.load8_u (local.get $hi)))
        (i32.store8 (local.get $hi) (local.get $byte))
        (local.set $lo (i32.add (local.get $lo) (i32.const 1)))
        (local.set $hi (i32.sub (local.get $hi) (i32.const 1)))
        (br $swap)))

    (call $progress (i64.extend_i32_u (local.get $len)) (i64.extend_i32_u (local.get $len)))
    (call $output_write (global.get $BUF) (local.get $len))
    (i32.const 0))
)
