//! The `kvmesh` node: configuration, the OpenAI HTTP API, the request pipeline, and adapters to
//! the inference engines beside it (a real vLLM or the engine simulator).
//!
//! Owns: process wiring (config, start-up, graceful shutdown), the HTTP surface clients and
//! operators see, forwarding a request to an engine and streaming its answer back, and watching
//! engines (health, `/metrics`, KV-cache events).
//!
//! Must not: decide policy itself (parsing, validation, candidate evidence and engine choice
//! live in `policy`), or speak anything to an engine that a real vLLM would not understand:
//! requests reach the engine as the client's bytes (the stated exceptions: the fields only the
//! node may set are removed at the edge, a guardrail rewrite, and a prefill/decode split).
//!
//! Layout, in the order a request meets it:
//! - `http_server`: accepts connections (header deadline, connection cap, client address).
//! - `api`: the HTTP routes; makes each request's `ctx::RequestCtx`. `api::admin` holds the
//!   admin and mesh-debug routes behind one authorization layer.
//! - `request`: the client request path as named stages, top to bottom
//!   (admit → tokenize → limit → place → pick → forward → relay).
//! - `guard`: admission and answer control (`auth`, `limits`, `hooks`, `admit`, `answer`,
//!   `stream`, `tasks`). Never routes.
//! - `tokens`: the tokenizer service (the tokenize stage).
//! - `router`: engine choice and forwarding (`pick`, `forward`, `split`, `relay`, `cells`,
//!   `peer`). Never admits.
//! - `mesh`: the QUIC endpoint and gossip membership, what this node publishes, the cells
//!   backbone, and `mesh::view`, the routing view of peers' engines rebuilt on every gossip
//!   change.
//! - `engine`: this node's engines (pollers, KV-event subscribers, exact indexes).
//! - `cells`: the cells table and the gateway loop.
//! - `audit`, `metrics`, `telemetry`, `reply` (errors as answers), `config`, `node` (start
//!   and stop).

// What other crates use (the binary, its tools, tests) is public; the request path is the
// node's own.
pub mod audit;
pub mod cells;
pub mod config;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod mesh;
pub mod node;
pub mod telemetry;

pub(crate) mod api;
pub(crate) mod ctx;
pub(crate) mod guard;
pub(crate) mod http_server;
pub(crate) mod metrics;
pub(crate) mod reply;
pub(crate) mod request;
pub(crate) mod router;
pub(crate) mod tokens;

pub use config::Config;
pub use error::NodeError;
pub use node::{Node, RunningNode, StartOptions};
