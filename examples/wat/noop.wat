;; The smallest valid work unit: no imports, one page of memory, and a `run` that succeeds with
;; empty output.
(module
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (i32.const 0))
)
