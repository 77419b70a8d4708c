//! coordinator-free: volunteer computing without a coordinator. Peers connect directly, run
//! WebAssembly work units in a deterministic sandbox, and validate results by redundant
//! execution.

pub mod digest;
pub mod membership;
pub mod peer_id;
pub mod rng;
pub mod sandbox;
