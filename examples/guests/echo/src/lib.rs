//! Returns its input unchanged: the smallest possible unit, for measuring per-unit overhead and
//! exercising the raw input and output paths.

use task_sdk::{Context, Error};

/// The work unit: output = input, byte for byte.
pub fn unit(input: &[u8], _ctx: &mut Context) -> Result<Vec<u8>, Error> {
    Ok(input.to_vec())
}

task_sdk::bytes_unit!(unit);

#[cfg(test)]
mod tests {
    use super::*;
    use task_sdk::native::Harness;

    #[test]
    fn output_equals_input() {
        let inputs: [&[u8]; 3] = [b"", b"hello", &[0, 255, 10, 13, 0]];
        for input in inputs {
            let outcome = Harness::new(input).run_bytes(unit);
            assert_eq!(outcome.result.unwrap(), input);
            assert!(outcome.logs.is_empty());
        }
        let big: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        assert_eq!(
            Harness::new(big.clone()).run_bytes(unit).result.unwrap(),
            big
        );
    }
}
