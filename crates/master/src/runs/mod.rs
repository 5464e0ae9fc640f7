//! The state of runs: one [`Run`] per fired instance, one [`MachineRun`] per targeted machine.
//! Only the engine task mutates these; everyone else sees serialisable views.

pub mod model;
pub mod output;

pub use model::{MachineRun, MachineStatus, MachineView, Run, RunView};
pub use output::OutputBuffer;
