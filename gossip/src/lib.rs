//! Membership and cluster state: which nodes are in the mesh, which are alive, and what each one
//! publishes about itself. That is its role, models, addresses, engine load, per-tenant usage
//! of the rate-limit window, a KV-prefix summary (as a versioned slot), and with cells the cells
//! table a gateway republishes.
//!
//! Gossip is chitchat 0.11 (scuttlebutt anti-entropy, phi-accrual failure detection). Its
//! messages travel on the node's QUIC endpoint from `transport` (`quic`), never on chitchat's
//! own UDP transport. 0.11 is the last release that exposes message (de)serialization, which a
//! foreign transport needs (see ARCHITECTURE.md). Every value a node publishes is signed with
//! its node certificate's key and checked by readers before use (`signed`), since chitchat
//! relays each member's state through the others.
//!
//! Must not: make routing decisions (that is `policy`) or open sockets of its own. chitchat's
//! `Transport` trait returns `anyhow::Result`, so that type appears in `quic` and nowhere else.

pub mod error;
pub mod membership;
pub mod quic;
pub mod schema;
pub mod signed;
pub mod wire;

pub use error::GossipError;
pub use membership::{GossipConfig, Membership, Peer};
pub use schema::{
    CellMember, CellReport, EngineLoad, EngineRole, KvSummarySlot, LoadReport, NodeMeta, NodeRole, TenantUsage,
    UsageReport, SCHEMA_VERSION,
};
