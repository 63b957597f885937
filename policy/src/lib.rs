//! Decisions about a request, independent of how bytes reach this node.
//!
//! Owns: the OpenAI request surface as kvmesh understands it (parsing, validation, the error
//! envelope), turning a prompt into token ids (the model's tokenizer and chat template), cutting
//! ids into chain-hashed KV blocks, and choosing an engine for a request.
//!
//! Must not: open sockets, spawn tasks, read the clock for routing, or know about QUIC, HTTP
//! servers or gossip. Everything here is called by `node` (and by the cluster simulator in `sim`)
//! with the facts it needs passed in, so the same code runs in production and in simulation.

pub mod affinity;
pub mod auth;
pub mod blocks;
pub mod candidates;
pub mod cells;
pub mod chat;
pub mod convert;
pub mod endpoint;
pub mod error;
pub mod fast_encode;
pub mod flow;
pub mod guardrails;
pub mod limits;
pub mod models;
pub mod openai;
pub mod pd;
pub mod predict;
pub mod prefix_index;
pub mod prompt_encoder;
pub mod pyjson;
pub mod request;
pub mod route;
pub mod route_history;
pub mod score;
pub mod segments;
pub mod summary;
pub mod tokenize;

pub use error::PolicyError;
