//! The `kvmesh` node: configuration, the OpenAI HTTP API, the request pipeline, and adapters to
//! the inference engines beside it (a real vLLM or the engine simulator).
//!
//! Owns: process wiring (config, start-up, graceful shutdown), the HTTP surface clients and
//! operators see, forwarding a request to an engine and streaming its answer back, and watching
//! engines (health, `/metrics`, KV-cache events).
//!
//! Must not: decide policy itself (parsing, validation and engine choice live in `policy`), or
//! speak anything to an engine that a real vLLM would not understand: requests reach the engine
//! as the client's original bytes.

pub mod api;
pub mod audit;
pub mod bench;
pub mod bench_gossip;
pub mod bench_routing;
pub mod bench_tokenize;
pub mod cells;
pub mod config;
pub mod demo;
pub mod engine;
pub mod error;
pub mod guard;
pub mod mesh;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod simulate;
pub mod telemetry;
pub mod tokens;

pub use config::Config;
pub use error::NodeError;
pub use node::{Node, RunningNode, StartOptions};
