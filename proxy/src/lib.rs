//! iamlet's data plane: a thread-per-core monoio HTTP/1.1 server that answers pods' instance
//! metadata requests from the resolver's lock-free snapshot and passes other paths to the
//! real metadata service. It holds no tokio or kube type: the control plane is in
//! `iamlet-resolver`, the node plane (iptables, interfaces, doctor's checks) in
//! `iamlet-node`.

pub mod args;
pub mod config;
pub mod conn;
pub mod conns;
pub mod container;
pub mod doctor;
pub mod downstream;
pub mod duration;
pub mod fairness;
pub mod handler;
pub mod handover;
pub mod latency;
pub mod malloc;
pub mod metrics;
pub mod notify;
pub mod passthrough;
pub mod respond;
pub mod route;
pub mod server;
pub mod shared;
pub mod sockopt;
pub mod token;
pub mod upstream;
pub mod worker;
