//! The state of runs: one [`Run`] per fired instance, one [`MachineRun`] per targeted machine.
//! Only the engine task mutates these; everyone else sees serialisable views, whose types the
//! store owns because it builds them from stored runs as well.

pub mod model;

pub use model::{MachineRun, Run};
pub use saltpeter_store::{MachineStatus, MachineView, OutputBuffer, RunView};
