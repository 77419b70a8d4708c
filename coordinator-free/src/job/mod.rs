//! Jobs: a module and many inputs, described by a manifest.

pub mod local;
pub mod manifest;
pub mod results;

pub use local::{LocalJob, LocalJobError, LocalProgress, LocalSummary, UnitRecord};
pub use manifest::{
    InputSpec, JobLimits, JobManifest, ManifestError, Redundancy, Sweep, UnitInput,
};
