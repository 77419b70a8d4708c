;; A unit for moving data: reads its whole input and writes back an 8-byte checksum (the sum of
;; the input's 64-bit little-endian words, then of its remaining bytes). The data-path
;; benchmark runs it on inputs of many MiB, where delivering the input is the work.
(module
  (import "cf1" "input_len" (func $input_len (result i32)))
  (import "cf1" "input_read"
    (func $input_read (param $dst i32) (param $offset i32) (param $len i32) (result i32)))
  (import "cf1" "output_write" (func $output_write (param $src i32) (param $len i32)))

  (memory (export "memory") 1)

  ;; The checksum is written at 0; the input is read to $BUF.
  (global $BUF i32 (i32.const 64))

  (func (export "run") (result i32)
    (local $len i32)
    (local $at i32)
    (local $end i32)
    (local $words i32)
    (local $sum i64)

    (local.set $len (call $input_len))
    ;; Pages for $BUF + len bytes, in 64 bits because len is unsigned.
    (if (i64.gt_u
          (i64.shr_u
            (i64.add
              (i64.add (i64.extend_i32_u (global.get $BUF)) (i64.extend_i32_u (local.get $len)))
              (i64.const 65535))
            (i64.const 16))
          (i64.extend_i32_u (memory.size)))
      (then
        (drop
          (memory.grow
            (i32.wrap_i64
              (i64.sub
                (i64.shr_u
                  (i64.add
                    (i64.add (i64.extend_i32_u (global.get $BUF)) (i64.extend_i32_u (local.get $len)))
                    (i64.const 65535))
                  (i64.const 16))
                (i64.extend_i32_u (memory.size))))))))
    (drop (call $input_read (global.get $BUF) (i32.const 0) (local.get $len)))

    (local.set $at (global.get $BUF))
    (local.set $end (i32.add (global.get $BUF) (local.get $len)))
    (local.set $words (i32.add (global.get $BUF) (i32.and (local.get $len) (i32.const -8))))
    (block $done
      (loop $word
        (br_if $done (i32.ge_u (local.get $at) (local.get $words)))
        (local.set $sum (i64.add (local.get $sum) (i64.load (local.get $at))))
        (local.set $at (i32.add (local.get $at) (i32.const 8)))
        (br $word)))
    (block $done
      (loop $byte
        (br_if $done (i32.ge_u (local.get $at) (local.get $end)))
        (local.set $sum (i64.add (local.get $sum) (i64.load8_u (local.get $at))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))
        (br $byte)))

    (i64.store (i32.const 0) (local.get $sum))
    (call $output_write (i32.const 0) (i32.const 8))
    (i32.const 0))
)
