//! Support code for iamlet's end-to-end tests: the real `iamlet` binary, `moto_server` as
//! STS, an in-process fake IMDS and raw HTTP clients bound to chosen 127.0.0.x sources.
//! Everything talks only to 127.0.0.0/8, every wait is bounded, and every process started
//! here is killed by PID on drop. It contains no tests of iamlet itself (see `tests/tests/`).

pub mod apiserver;
pub mod attack;
pub mod client;
pub mod drivers;
pub mod iamlet;
pub mod imds;
pub mod marker;
pub mod moto;
pub mod netns;
pub mod process;
pub mod python;
pub mod realapi;
pub mod rig;
pub mod stsproxy;
pub mod util;
pub mod wait;
pub mod wire;

pub use apiserver::{ApiServer, PodBuilder};
pub use client::{Conn, Response, get_from, request_from, try_request_from};
pub use drivers::drivers;
pub use iamlet::{Iamlet, IamletBuilder};
pub use imds::{FakeImds, FakeImdsBuilder, NODE_MARKER, Recorded};
pub use moto::Moto;
pub use process::Output;
pub use python::{python, run_python};
pub use util::{free_port, is_ci, workspace_root};
