//! Credentials: per-key slots, the STS client and the manager that fills the slots.

pub mod manager;
pub mod slot;
pub mod sts;

pub use slot::{CredAnswer, CredKey, CredSlot, Origin, PodSession};
pub use sts::StsError;
