//! Benchmark workload shapes (`shared/workloads/*.toml`, copies in `examples/workloads/`), read
//! by the real-time routing benchmark and by the cluster simulator alike, so both run the same
//! numbers.

use std::path::Path;

use rand::Rng;
use serde::Deserialize;

use crate::SimError;

#[derive(Debug, Clone, Deserialize)]
pub struct SharedPrefix {
    /// Distinct shared prefixes at 8 engines; the cluster simulator scales them with the
    /// cluster, as the workload README asks.
    pub groups: usize,
    pub prefix_tokens: usize,
    pub question_tokens: usize,
    pub output_tokens: u32,
    /// How requests pick their group: `"uniform"` (the default) or `"zipf:S"` (group `k`
    /// weighted `1 / (k + 1)^S`).
    #[serde(default)]
    pub group_popularity: Popularity,
    /// Share of requests for one hot group (group 0) before `group_popularity` draws the rest:
    /// a prefix carrying more traffic than one engine can serve.
    #[serde(default)]
    pub hot_share: f64,
    /// Requests per arrival: each arrival sends this many requests for the same group at once,
    /// each to a random node, so a prefix's first requests reach several nodes within one
    /// gossip round. The rate still counts requests.
    #[serde(default = "one")]
    pub burst: usize,
    pub slo: Slo,
}

fn one() -> usize {
    1
}

/// How a shared-prefix workload's requests pick their group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Popularity {
    #[default]
    Uniform,
    /// Group `k` (from 0) weighted `1 / (k + 1)^s`.
    Zipf(f64),
}

impl<'de> Deserialize<'de> for Popularity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.split_once(':') {
            None if s == "uniform" => Ok(Popularity::Uniform),
            Some(("zipf", x)) => match x.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => Ok(Popularity::Zipf(v)),
                _ => Err(serde::de::Error::custom(format!("group_popularity `{s}`: zipf's exponent must be above 0"))),
            },
            _ => Err(serde::de::Error::custom(format!(
                "group_popularity `{s}`: \"uniform\" or \"zipf:S\" (e.g. \"zipf:1.1\")"
            ))),
        }
    }
}

impl SharedPrefix {
    /// The group of one request among `groups`.
    pub fn draw_group(&self, rng: &mut impl Rng, groups: u64) -> u64 {
        let groups = groups.max(1);
        if self.hot_share > 0.0 && rng.random::<f64>() < self.hot_share {
            return 0;
        }
        match self.group_popularity {
            Popularity::Uniform => rng.random_range(0..groups),
            Popularity::Zipf(s) => {
                let weight = |k: u64| 1.0 / ((k + 1) as f64).powf(s);
                let total: f64 = (0..groups).map(weight).sum();
                let mut x = rng.random::<f64>() * total;
                for k in 0..groups {
                    x -= weight(k);
                    if x <= 0.0 {
                        return k;
                    }
                }
                groups - 1
            }
        }
    }

    /// Checks the knobs a file may get wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..1.0).contains(&self.hot_share) {
            return Err(format!("hot_share must be in [0, 1), not {}", self.hot_share));
        }
        if self.burst == 0 || self.burst > 1024 {
            return Err(format!("burst must be 1 to 1024, not {}", self.burst));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Slo {
    pub ttft_p90_s: f64,
    /// When set, a request counts toward goodput only if its own inter-token p99 is within it.
    #[serde(default)]
    pub itl_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LongPrompt {
    pub prompt_tokens: Dist,
    pub shared_prefix_tokens: usize,
    pub output_tokens: u32,
    pub slo: Slo,
}

#[derive(Debug, Clone, Deserialize)]
pub struct MultiTurn {
    pub conversations: usize,
    pub system_prompt_tokens: usize,
    pub turns: usize,
    pub user_tokens: Dist,
    pub output_tokens: Dist,
    pub think_time_s: Dist,
    pub slo: Slo,
}

/// Tool-using agents (coding agents, tool-calling chat): each run sends the agent's tool
/// definitions (several KB of JSON schema, one of a few tool sets) with a system prompt and a
/// task, then `steps` rounds of the model calling a tool (its reply becomes an assistant
/// `tool_calls` message) and the tool's result coming back as a `tool` message, every round
/// resending the whole history. Rendered by a real model's chat template, so the tools sit in
/// the prompt where the template puts them.
#[derive(Debug, Clone, Deserialize)]
pub struct Agentic {
    /// Agent runs, started as a Poisson process at rate / steps (at most this many).
    pub agents: usize,
    /// Distinct tool sets; an agent uses one (agents of one product share theirs).
    pub toolsets: usize,
    /// Tools per set, and the size of each tool's description.
    pub tools_per_set: usize,
    pub tool_description_tokens: usize,
    pub system_prompt_tokens: usize,
    pub task_tokens: Dist,
    /// Tool-call rounds per run.
    pub steps: usize,
    /// A tool's result (a file read, a search's hits).
    pub tool_result_tokens: Dist,
    /// The model's output per round (the call's arguments).
    pub output_tokens: Dist,
    /// Time the tool takes between the model's call and the next round.
    pub tool_time_s: Dist,
    pub slo: Slo,
}

/// A workload number: fixed, or normal with a mean and standard deviation.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Dist {
    Fixed(f64),
    Normal { mean: f64, stddev: f64 },
}

impl Dist {
    /// A draw, at least `min`.
    pub fn sample(&self, rng: &mut impl Rng, min: f64) -> f64 {
        match *self {
            Dist::Fixed(v) => v.max(min),
            Dist::Normal { mean, stddev } => {
                // Box-Muller.
                let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + stddev * z).max(min)
            }
        }
    }

    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed(v) => v,
            Dist::Normal { mean, .. } => mean,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Workload {
    SharedPrefix(SharedPrefix),
    MultiTurn(MultiTurn),
    LongPrompt(LongPrompt),
    Agentic(Agentic),
}

impl Workload {
    /// Reads a workload file; its `name` says which shape it is.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        let bad = |e: String| SimError::Cluster(format!("workload {}: {e}", path.display()));
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("{e} (pass a workload file, e.g. ../shared/workloads/shared-prefix.toml)")))?;
        Self::parse(&text).map_err(bad)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let name = toml::from_str::<toml::Table>(text)
            .map_err(|e| e.to_string())?
            .get("name")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let e = |e: toml::de::Error| e.to_string();
        Ok(match name.as_str() {
            "shared-prefix" => {
                let w: SharedPrefix = toml::from_str(text).map_err(e)?;
                w.validate()?;
                Workload::SharedPrefix(w)
            }
            "multi-turn-chat" => Workload::MultiTurn(toml::from_str(text).map_err(e)?),
            "long-prompt" => Workload::LongPrompt(toml::from_str(text).map_err(e)?),
            "agentic" => Workload::Agentic(toml::from_str(text).map_err(e)?),
            other => {
                return Err(format!(
                    "`name = \"{other}\"`: known workloads are shared-prefix, multi-turn-chat, long-prompt and agentic"
                ))
            }
        })
    }

    pub fn slo(&self) -> &Slo {
        match self {
            Workload::SharedPrefix(w) => &w.slo,
            Workload::MultiTurn(w) => &w.slo,
            Workload::LongPrompt(w) => &w.slo,
            Workload::Agentic(w) => &w.slo,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Workload::SharedPrefix(w) => {
                let mut d = format!(
                    "`shared-prefix`: {} groups × {}-token shared prefix, {}-token unique question, {} output tokens",
                    w.groups, w.prefix_tokens, w.question_tokens, w.output_tokens
                );
                if let Popularity::Zipf(s) = w.group_popularity {
                    d.push_str(&format!(", groups Zipf-popular (s = {s})"));
                }
                if w.hot_share > 0.0 {
                    d.push_str(&format!(", {:.0}% of requests for one hot group", w.hot_share * 100.0));
                }
                if w.burst > 1 {
                    d.push_str(&format!(", requests in bursts of {} for one group at once", w.burst));
                }
                d
            }
            Workload::MultiTurn(w) => format!(
                "`multi-turn-chat`: conversations of {} turns sharing a {}-token system prompt, ~{:.0}-token user \
                 turns, ~{:.0}-token replies kept in the history, ~{:.0} s think time; conversations start at rate / \
                 {} (at most {})",
                w.turns,
                w.system_prompt_tokens,
                w.user_tokens.mean(),
                w.output_tokens.mean(),
                w.think_time_s.mean(),
                w.turns,
                w.conversations
            ),
            Workload::LongPrompt(w) => format!(
                "`long-prompt`: ~{:.0}-token prompts (a {}-token shared instruction, the rest unique), {} output tokens",
                w.prompt_tokens.mean(),
                w.shared_prefix_tokens,
                w.output_tokens
            ),
            Workload::Agentic(w) => format!(
                "`agentic`: agent runs of {} tool-call rounds; {} tool sets of {} tools with ~{}-token descriptions \
                 (sent as `tools`), a {}-token system prompt, ~{:.0}-token tasks, ~{:.0}-token calls and ~{:.0}-token \
                 tool results kept in the history, ~{:.1} s per tool; runs start at rate / {} (at most {})",
                w.steps,
                w.toolsets,
                w.tools_per_set,
                w.tool_description_tokens,
                w.system_prompt_tokens,
                w.task_tokens.mean(),
                w.output_tokens.mean(),
                w.tool_result_tokens.mean(),
                w.tool_time_s.mean(),
                w.steps,
                w.agents
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_workloads_parse() {
        for f in ["shared-prefix", "multi-turn-chat", "long-prompt", "agentic", "hot-prefix", "burst-prefix"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/workloads/{f}.toml"));
            Workload::load(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        assert!(Workload::parse("name = \"nope\"").unwrap_err().contains("known workloads"));
    }

    fn shared(extra: &str) -> Result<SharedPrefix, String> {
        let text = format!(
            "name = \"shared-prefix\"\ngroups = 16\nprefix_tokens = 10\nquestion_tokens = 5\noutput_tokens = 1\n\
             slo = {{ ttft_p90_s = 1.0 }}\n{extra}"
        );
        match Workload::parse(&text)? {
            Workload::SharedPrefix(w) => Ok(w),
            _ => Err("not shared-prefix".into()),
        }
    }

    #[test]
    fn group_popularity_hot_share_and_bursts_are_read_and_drawn() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let count = |w: &SharedPrefix, rng: &mut rand::rngs::SmallRng| {
            let mut c = [0u32; 16];
            for _ in 0..16_000 {
                c[w.draw_group(rng, 16) as usize] += 1;
            }
            c
        };
        let uniform = shared("").expect("uniform by default");
        assert_eq!((uniform.group_popularity, uniform.hot_share, uniform.burst), (Popularity::Uniform, 0.0, 1));
        assert!(count(&uniform, &mut rng).iter().all(|&n| (800..1200).contains(&n)));
        // Zipf 1.0 over 16 groups: the first takes 1 / H(16) = 29.5%, the second half that.
        let zipf = shared("group_popularity = \"zipf:1.0\"").expect("zipf");
        let c = count(&zipf, &mut rng);
        assert!((4400..5100).contains(&c[0]) && (2100..2600).contains(&c[1]), "{c:?}");
        let hot = shared("hot_share = 0.3").expect("hot");
        let c = count(&hot, &mut rng);
        assert!((5200..5800).contains(&c[0]), "30% plus its uniform share of the rest: {c:?}");
        assert_eq!(shared("burst = 4").expect("burst").burst, 4);
        for bad in ["group_popularity = \"zipf:0\"", "group_popularity = \"pareto\"", "hot_share = 1.0", "burst = 0"] {
            assert!(shared(bad).is_err(), "{bad} is refused");
        }
    }
}
