//! coordinator-free: volunteer computing without a coordinator. Peers connect directly, run
//! WebAssembly work units in a deterministic sandbox, and validate results by redundant
//! execution.

pub mod bitset;
mod budget;
mod bytes;
pub mod census;
#[cfg(unix)]
pub mod conditions;
#[cfg(unix)]
pub mod control;
pub mod digest;
/// The bodies of the fuzz targets in `fuzz/`, shared with the corpus replay test; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod identity;
pub mod job;
pub mod job_advert;
#[cfg(unix)]
pub mod ledger;
pub mod membership;
pub mod net;
#[cfg(unix)]
pub mod node;
pub mod overlay;
pub mod peer_id;
pub mod reach;
pub mod relay;
pub mod rng;
pub mod sandbox;
pub mod schedule;
mod sim_queue;
pub mod store;
pub mod survey;
pub mod suspend;
pub mod text;
pub mod toml_text;
pub mod traffic;
pub mod ui;
pub mod validate;
pub mod wire;
