//! Jobs: a module and many inputs, described by a manifest.

pub mod manifest;
pub mod results;

pub use manifest::{
    InputSpec, JobLimits, JobManifest, ManifestError, Redundancy, Sweep, UnitInput,
};
