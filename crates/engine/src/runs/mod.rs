//! The state of runs: one [`Run`] per fired instance, one [`MachineRun`] per targeted machine.
//! Only the engine task mutates these; everyone else sees serialisable views, whose types the
//! store owns because it builds them from stored runs as well.

pub(crate) mod model;

pub(crate) use model::{MachineRun, Run};
pub(crate) use saltpeter_store::{MachineStatus, MachineView, OutputBuffer, RunView};
