//! The example work units, built to WebAssembly by this crate's build script. Each constant is
//! the path of one module; [`read`] loads it.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

/// The bytes of the module at `path` (one of this crate's constants).
///
/// # Panics
///
/// If the file is gone, which only happens when the build directory was tampered with.
pub fn read(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("cannot read example module {path}: {e}"))
}
