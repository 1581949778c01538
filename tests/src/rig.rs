//! Ready-made rigs for the test files: [`data`] (local mode, a fixed set of pods on 127.0.0.x,
//! for the data-plane files) and [`control`] (the stand-in API server, for the control-plane
//! files).

pub mod control;
pub mod data;
