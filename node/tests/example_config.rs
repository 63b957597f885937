//! The shipped example config parses and validates, so the docs cannot drift from `Config`.

use kvmesh_node::config::{Config, ServeArgs};

#[test]
fn example_node_toml_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/node.toml");
    let cfg = Config::load(&ServeArgs { config: Some(path.into()), ..Default::default() }).unwrap();
    assert_eq!(cfg.engines.len(), 2);
    assert_eq!(cfg.engines[0].kv_events.as_deref(), Some("tcp://127.0.0.1:5557"));
    assert_eq!(cfg.embedded.timing.step_floor_ms, 6.5);
}
