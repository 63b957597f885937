//! Reading the few numbers a router needs out of an engine's Prometheus text.
//!
//! Accepts vLLM's current and older names (`kv_cache_usage_perc` / `gpu_cache_usage_perc`) and
//! sums over label sets (a data-parallel engine reports one series per rank).

/// Load and cache facts scraped from one engine.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineLoad {
    pub running: f64,
    pub waiting: f64,
    pub kv_usage: f64,
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u32>,
    pub prefix_queries: f64,
    pub prefix_hits: f64,
    pub generation_tokens: f64,
}

/// Parses Prometheus text exposition. Lines that do not parse are skipped: a scrape is best
/// effort, and an engine adding metrics must not break routing.
pub fn parse(text: &str) -> EngineLoad {
    parse_rank(text, None)
}

/// As `parse`, keeping only data-parallel rank `rank`'s series (vLLM labels them
/// `engine="{rank}"`); series without the label count for every rank.
pub fn parse_rank(text: &str, rank: Option<u32>) -> EngineLoad {
    let rank = rank.map(|r| r.to_string());
    let mut load = EngineLoad::default();
    let mut kv_usage_series = 0u32;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, value)) = split_sample(line) else {
            continue;
        };
        if let (Some(want), Some(got)) = (&rank, label(labels, "engine")) {
            if got != want {
                continue;
            }
        }
        match name {
            "vllm:num_requests_running" => load.running += value,
            "vllm:num_requests_waiting" => load.waiting += value,
            "vllm:kv_cache_usage_perc" | "vllm:gpu_cache_usage_perc" => {
                load.kv_usage += value;
                kv_usage_series += 1;
            }
            "vllm:prefix_cache_queries_total" => load.prefix_queries += value,
            "vllm:prefix_cache_hits_total" => load.prefix_hits += value,
            "vllm:generation_tokens_total" => load.generation_tokens += value,
            "vllm:cache_config_info" => {
                load.block_size = label(labels, "block_size").and_then(|v| v.parse().ok());
                load.num_gpu_blocks = label(labels, "num_gpu_blocks").and_then(|v| v.parse().ok());
            }
            _ => {}
        }
    }
    if kv_usage_series > 1 {
        // Both names present (a transition release), or one per rank: report the mean.
        load.kv_usage /= kv_usage_series as f64;
    }
    load
}

/// `name{labels} value [timestamp]` -> (name, labels, value).
fn split_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (name, rest, labels) = match line.find('{') {
        Some(open) => {
            let close = line[open..].rfind('}')? + open;
            (&line[..open], &line[close + 1..], &line[open + 1..close])
        }
        None => {
            let sp = line.find(char::is_whitespace)?;
            (&line[..sp], &line[sp..], "")
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    value.is_finite().then_some((name.trim(), labels, value))
}

/// The value of `key` in a label list like `a="1",b="x"`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let k = rest[..eq].trim().trim_start_matches(',').trim();
        let after = rest[eq + 1..].strip_prefix('"')?;
        // Label values escape quotes as \" ; find the closing unescaped quote.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in after.char_indices() {
            match c {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(i);
                    break;
                }
                _ => escaped = false,
            }
        }
        let end = end?;
        if k == key {
            return Some(&after[..end]);
        }
        rest = after[end + 1..].trim_start_matches(',');
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = r#"# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:cache_config_info{block_size="16",cache_dtype="auto",engine="0",num_gpu_blocks="28000",prefix="a\"b"} 1.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 40
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 7
"#;

    #[test]
    fn reads_vllm_names() {
        let l = parse(SAMPLE);
        assert_eq!(l.running, 3.0);
        assert_eq!(l.waiting, 2.0);
        assert_eq!(l.kv_usage, 0.25);
        assert_eq!(l.block_size, Some(16));
        assert_eq!(l.num_gpu_blocks, Some(28_000));
        assert_eq!(l.prefix_hits, 40.0);
    }

    #[test]
    fn sums_ranks() {
        let l = parse("vllm:num_requests_running{engine=\"0\"} 1\nvllm:num_requests_running{engine=\"1\"} 2\n");
        assert_eq!(l.running, 3.0);
        let text = "vllm:num_requests_running{engine=\"0\"} 1\nvllm:num_requests_running{engine=\"1\"} 2\n\
                    vllm:cache_config_info{block_size=\"16\",engine=\"1\"} 1\n";
        let r1 = parse_rank(text, Some(1));
        assert_eq!((r1.running, r1.block_size), (2.0, Some(16)), "one rank's series only");
        assert_eq!(parse_rank(text, Some(0)).running, 1.0);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn never_panics_on_metric_like_lines(name in "vllm:[a-z_]{1,30}", labels in "[a-z_=\",{}\\\\ ]{0,40}", v in "[0-9.eE+-]{0,8}") {
            let _ = parse(&format!("{name}{{{labels}}} {v}\n{name} {v}"));
        }
    }
}
