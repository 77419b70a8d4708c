//! Jobs: a module and many inputs, described by a manifest.

pub mod manifest;

pub use manifest::{
    InputSpec, JobLimits, JobManifest, ManifestError, Redundancy, Sweep, UnitInput,
};
