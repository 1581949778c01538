//! Where pods come from: the Kubernetes API (watcher) or a local file.

pub mod file;
pub mod kube;
