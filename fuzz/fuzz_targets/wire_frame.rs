#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| coordinator_free::fuzzing::wire_frame(data));
