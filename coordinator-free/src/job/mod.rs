//! Jobs: a module and many inputs, described by a manifest.

pub mod driver;
pub mod inputs;
pub mod local;
pub mod manifest;
pub mod proto;
pub mod results;

pub use driver::{JobData, JobError, JobProgress, JobSummary, UnitRecord, WorkerEvent, Workers};
pub use inputs::{InputError, UnitSource};
pub use local::{LocalJob, LocalJobError, LocalProgress, LocalSummary};
pub use manifest::{
    InputSpec, JobLimits, JobManifest, ManifestError, Redundancy, Sweep, UnitInput,
};
