//! One module per subcommand: its flags and its `run`. What several commands share lives beside this folder
//! (model source, output, model-file writing, error chain).

pub mod average;
pub mod bench;
pub mod compare;
pub mod convert;
pub mod data;
pub mod eval;
pub mod models;
pub mod read;
pub mod serve;
pub mod synth;
pub mod train;
