//! The shipped example config parses and validates, so the docs cannot drift from `Config`.

use kvmesh_node::config::{Config, ServeArgs};

#[test]
fn example_node_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node.toml");
    let cfg = Config::load(&ServeArgs { config: Some(path.into()), ..Default::default() }).unwrap();
    assert_eq!(cfg.engines.len(), 2);
    assert_eq!(cfg.engines[0].kv_events.as_deref(), Some("tcp://127.0.0.1:5557"));
    assert_eq!(cfg.engines[0].kv_events_replay.as_deref(), Some("tcp://127.0.0.1:5567"));
    assert_eq!(cfg.embedded.timing.step_floor_ms, 6.5);
}

#[test]
fn example_guard_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/guard.toml");
    let cfg = Config::load(&ServeArgs { config: Some(path.into()), ..Default::default() }).unwrap();
    assert!(cfg.auth.enabled());
    assert_eq!(cfg.auth.keys[0].key_sha256, kvmesh_policy::auth::hash_key("sk-example-admin"));
    assert_eq!(cfg.limits.for_tenant("ops").requests_per_minute, Some(6000));
    assert_eq!(cfg.limits.for_tenant("acme").max_tokens, Some(4096));
    assert_eq!(cfg.guardrails.len(), 5);
    assert_eq!(cfg.audit.on_full, kvmesh_node::audit::OnFull::Reject);
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/keys.toml");
    let entries = kvmesh_node::config::KeysFile::read(std::path::Path::new(keys)).unwrap();
    let store = kvmesh_policy::auth::KeyStore::new(&entries).unwrap();
    assert_eq!(store.verify(Some("Bearer sk-example-acme")).unwrap().name, "acme");
}

#[test]
fn example_cells_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/cells.toml");
    let cfg = Config::load(&ServeArgs { config: Some(path.into()), ..Default::default() }).unwrap();
    assert_eq!((cfg.cells.name.as_deref(), cfg.cells.elected_gateways, cfg.cells.gateway), (Some("rack-a"), 2, false));
    assert_eq!(cfg.cells.backbone_seeds.len(), 4);
    assert_eq!(cfg.cells.routing, kvmesh_policy::cells::CellSettings::default());
}
