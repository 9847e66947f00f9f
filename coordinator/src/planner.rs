//! Placement as a pure function: from the model, the wanted layout and the live workers,
//! which replicas to run and which worker holds each rank. Replicas whose workers are all
//! still live are kept as they are (nothing moves); the other workers form new replicas of
//! the wanted layout, and workers too few for it form smaller replicas that fit their
//! memory (a TP-2 replica that lost a rank continues as TP 1 on the survivor).

use cluster::layout::Layout;
use cluster::membership::WorkerCard;
use cluster::precision::rank_weight_bytes;
use cluster::{DType, LoadFormat, ModelConfig, Quantization, WeightDType};
use serde::{Deserialize, Serialize};

/// One replica: its layout and the worker ids of its ranks, by rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaPlan {
    pub layout: Layout,
    pub workers: Vec<String>,
    /// Mixtral with expert parallelism: redundant copies of hot experts, (layer, expert,
    /// expert-parallel rank), placed from the load the replica observed
    /// (`--redundant-experts`); a new replica starts without.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<(usize, usize, usize)>,
}

impl ReplicaPlan {
    /// Whether `other` is this replica on the same workers in the same ranks (its copies
    /// aside: those change in place).
    pub fn same_ranks(&self, other: &ReplicaPlan) -> bool {
        self.layout == other.layout && self.workers == other.workers
    }
}

/// The placement of a cluster in an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    pub epoch: u64,
    pub replicas: Vec<ReplicaPlan>,
    /// The shape an operator scaled the cluster to (`tramctl scale`), which outlives the
    /// coordinator's flags; None: the flags' layout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wanted: Option<Wanted>,
}

/// The wanted shape: a replica's layout and how many replicas at most.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wanted {
    pub layout: Layout,
    /// At most this many replicas (the other workers stay idle); 0 = as many as fit.
    #[serde(default)]
    pub replicas: usize,
}

/// What every rank must hold: its weights, as the workers keep them, and its KV cache (the
/// coordinator's flags of these names).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Sizing {
    /// The dtype workers keep dense weights in: auto (as the checkpoint stores them), f32,
    /// f16 or bf16.
    #[arg(long, env = "TRAMONTANE_DTYPE", default_value = "auto")]
    pub dtype: WeightDType,
    /// 8-bit weights: auto (FP8 checkpoints stay FP8), none, int8 or fp8 (quantized at load).
    #[arg(long, env = "TRAMONTANE_QUANTIZATION", default_value = "auto")]
    pub quantization: Quantization,
    /// Where weights come from: safetensors, or dummy (random, dense whatever the checkpoint
    /// declares).
    #[arg(long, default_value = "safetensors")]
    pub load_format: LoadFormat,
    /// KV cache blocks per worker.
    #[arg(long, env = "TRAMONTANE_KV_BLOCKS", default_value_t = 1024)]
    pub kv_blocks: usize,
    /// Tokens per KV cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Mixtral with expert parallelism: copies of the hottest experts per layer, placed on
    /// the least-loaded ranks from the observed load (EPLB); each rank keeps room for
    /// ⌈N / ep⌉ copies a layer.
    #[arg(long, env = "TRAMONTANE_REDUNDANT_EXPERTS", default_value_t = 0)]
    pub redundant_experts: usize,
    /// How often (seconds) the redundant experts are placed again from the load observed
    /// since the last time.
    #[arg(long, default_value_t = 30)]
    pub rebalance_secs: u64,
}

impl Sizing {
    /// Whether the weights are dummy (random) ones.
    fn dummy(&self) -> bool {
        self.load_format == LoadFormat::Dummy
    }
}

/// Bytes rank `rank` of `layout` holds: its weights in the formats the workers keep
/// ([`cluster::precision::rank_weight_bytes`]) and its KV cache (f32 keys and values of its KV
/// heads, for its stage's layers).
pub fn rank_need(c: &ModelConfig, layout: &Layout, rank: usize, s: &Sizing) -> (u64, u64) {
    let weights = if s.dummy() && c.fp8_weights {
        rank_weight_bytes(&ModelConfig { fp8_weights: false, ..c.clone() }, layout, rank, s.dtype, s.quantization)
    } else {
        rank_weight_bytes(c, layout, rank, s.dtype, s.quantization)
    };
    // Room for the redundant experts' copies: a rank with one more expert a layer, times the
    // copies a rank may hold (the router grows too: a little more than needed).
    let weights = match (s.redundant_experts, c.architecture, layout.ep) {
        (n, cluster::Architecture::Mixtral, ep) if n > 0 && ep > 1 => {
            let wider = ModelConfig { num_local_experts: c.num_local_experts + ep, ..c.clone() };
            let one =
                rank_weight_bytes(&wider, layout, rank, s.dtype, s.quantization).saturating_sub(rank_weight_bytes(c, layout, rank, s.dtype, s.quantization));
            weights + one * n.div_ceil(ep) as u64
        }
        _ => weights,
    };
    let at = layout.coords(rank);
    let layers = layout.layers(c.num_hidden_layers, at.stage).len();
    let kv_heads = layout.kv_heads(c, at.tensor).len();
    let kv = s.kv_blocks * s.block_size * layers * 2 * kv_heads * c.head_dim * 4;
    (weights, kv as u64)
}

/// What the largest rank of `layout` holds: (weights, KV cache) bytes.
pub fn rank_memory(c: &ModelConfig, layout: &Layout, s: &Sizing) -> (u64, u64) {
    (0..layout.world()).map(|r| rank_need(c, layout, r, s)).max_by_key(|(w, kv)| w + kv).unwrap_or((0, 0))
}

/// Whether `card` can hold rank `rank` of `layout`: a card's 0 memory is unknown, taken as enough.
fn holds(c: &ModelConfig, layout: &Layout, rank: usize, s: &Sizing, card: &WorkerCard) -> bool {
    let (w, kv) = rank_need(c, layout, rank, s);
    card.memory_bytes == 0 || card.memory_bytes >= w + kv
}

/// Whether `workers` (by rank) can hold `layout`.
fn fits(c: &ModelConfig, layout: &Layout, s: &Sizing, workers: &[&WorkerCard]) -> bool {
    layout.validate(c).is_ok() && workers.iter().enumerate().all(|(rank, card)| holds(c, layout, rank, s, card))
}

/// Layouts of exactly `world` ranks that fit the model, the wanted shape's order first.
fn layouts_of(world: usize, want: &Layout) -> Vec<Layout> {
    let mut out = Vec::new();
    for tp in (1..=world).rev().filter(|t| world.is_multiple_of(*t)) {
        for ep in (1..=world / tp).rev().filter(|e| (world / tp).is_multiple_of(*e)) {
            let pp = world / tp / ep;
            out.push(Layout { tp, ep, pp, stage_layers: Vec::new() });
        }
    }
    out.sort_by_key(|l| (l.tp != want.tp, l.ep != want.ep, l.pp != want.pp));
    out
}

/// Plans replicas over `workers` (live, not draining). Err says why no replica fits, with
/// the arithmetic and what would fit.
pub fn plan(config: &ModelConfig, want: &Layout, sizing: &Sizing, workers: &[WorkerCard], current: &[ReplicaPlan]) -> Result<Vec<ReplicaPlan>, String> {
    plan_wanted(config, &Wanted { layout: want.clone(), replicas: 0 }, sizing, workers, current)
}

/// [`plan`] of at most `wanted.replicas` replicas (the current ones kept first).
pub fn plan_wanted(
    config: &ModelConfig,
    wanted: &Wanted,
    sizing: &Sizing,
    workers: &[WorkerCard],
    current: &[ReplicaPlan],
) -> Result<Vec<ReplicaPlan>, String> {
    let want = &wanted.layout;
    let mut replicas = place(config, want, sizing, workers, current);
    if wanted.replicas > 0 {
        // The wanted layout's replicas first (kept ones before new ones), then the smaller.
        replicas.sort_by_key(|r| r.layout != *want);
        replicas.truncate(wanted.replicas);
    }
    if replicas.is_empty() {
        return Err(match workers.len() {
            0 => "no capacity remains: no live worker".to_owned(),
            _ => refusal(config, want, sizing, workers),
        });
    }
    Ok(replicas)
}

/// The replicas of [`plan`], none when nothing fits.
fn place(config: &ModelConfig, want: &Layout, sizing: &Sizing, workers: &[WorkerCard], current: &[ReplicaPlan]) -> Vec<ReplicaPlan> {
    let live = |id: &String| workers.iter().any(|w| &w.id == id);
    let mut replicas: Vec<ReplicaPlan> = current.iter().filter(|r| r.workers.iter().all(live)).cloned().collect();
    let mut free: Vec<&WorkerCard> = workers.iter().filter(|w| !replicas.iter().any(|r| r.workers.contains(&w.id))).collect();
    free.sort_by(|a, b| a.id.cmp(&b.id));
    let world = want.world();
    while let Some(workers) = take_group(config, want, sizing, &mut free) {
        replicas.push(ReplicaPlan { layout: want.clone(), workers, copies: Vec::new() });
    }
    // Too few (or too small) workers for the wanted layout: the largest layout that fits.
    'outer: while !free.is_empty() {
        for n in (1..=free.len().min(world)).rev() {
            for layout in layouts_of(n, want) {
                if let Some(workers) = take_group(config, &layout, sizing, &mut free) {
                    replicas.push(ReplicaPlan { layout, workers, copies: Vec::new() });
                    continue 'outer;
                }
            }
        }
        break;
    }
    replicas
}

/// Takes out of `free` the first workers (in its order) that hold `layout`'s ranks, rank by
/// rank, and returns their ids; None (and `free` untouched) when too few can. A worker too
/// small for a rank is passed over, never a reason to place nothing.
fn take_group(c: &ModelConfig, layout: &Layout, s: &Sizing, free: &mut Vec<&WorkerCard>) -> Option<Vec<String>> {
    layout.validate(c).ok()?;
    let mut picked: Vec<usize> = Vec::new();
    for rank in 0..layout.world() {
        picked.push((0..free.len()).find(|i| !picked.contains(i) && holds(c, layout, rank, s, free[*i]))?);
    }
    let ids = picked.iter().map(|&i| free[i].id.clone()).collect();
    picked.sort_unstable();
    for i in picked.into_iter().rev() {
        free.remove(i);
    }
    Some(ids)
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// `--tp 2 --pp 2` (the degrees above 1; `--tp 1` for one rank).
fn flags(l: &Layout) -> String {
    let f: Vec<String> = [("tp", l.tp), ("ep", l.ep), ("pp", l.pp)].iter().filter(|(_, n)| *n > 1).map(|(k, n)| format!("--{k} {n}")).collect();
    if f.is_empty() { "--tp 1".into() } else { f.join(" ") }
}

/// "a, b or c".
fn any_of(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// The dtype dense weights are kept in, and whether that is as stored.
fn dense_dtype(c: &ModelConfig, s: &Sizing) -> (DType, bool) {
    match s.dtype {
        WeightDType::As(d) => (d, false),
        WeightDType::Auto => (c.checkpoint_dtype.as_deref().and_then(|d| d.parse().ok()).unwrap_or(DType::F32), true),
    }
}

/// How the weights are kept, in words: "bf16 as stored", "f32", "int8 projections, the rest bf16 as stored".
fn weights_in_words(c: &ModelConfig, s: &Sizing) -> String {
    let (dense, as_stored) = dense_dtype(c, s);
    let dense = if as_stored { format!("{dense} as stored") } else { dense.to_string() };
    let fp8_stored = c.fp8_weights && !s.dummy();
    match s.quantization {
        Quantization::Int8 => format!("int8 projections, the rest {dense}"),
        Quantization::Fp8 if fp8_stored => format!("fp8 projections as stored, the rest {dense}"),
        Quantization::Fp8 => format!("fp8 projections, the rest {dense}"),
        Quantization::Auto if fp8_stored => format!("fp8 projections as stored, the rest {dense}"),
        Quantization::Auto | Quantization::None => dense,
    }
}

/// Why no replica fits `workers` (not empty), with the arithmetic of the wanted layout's
/// largest rank and the changes that would fit, each checked with the planner itself: other
/// weight formats, fewer KV cache blocks, or more workers like the largest one.
fn refusal(c: &ModelConfig, want: &Layout, s: &Sizing, workers: &[WorkerCard]) -> String {
    let (w, kv) = rank_memory(c, want, s);
    let ranks: Vec<(u64, u64)> = (0..want.world()).map(|r| rank_need(c, want, r, s)).collect();
    let each = if ranks.iter().all(|r| *r == ranks[0]) { "each rank" } else { "the largest rank" };
    let mut by_memory: Vec<&WorkerCard> = workers.iter().collect();
    by_memory.sort_by_key(|card| std::cmp::Reverse(card.memory_bytes));
    let (largest, smallest) = (by_memory[0], by_memory[by_memory.len() - 1]);
    let has = match workers.len() {
        1 => format!("{} has {}", largest.id, gb(largest.memory_bytes)),
        n if largest.memory_bytes == smallest.memory_bytes => format!("each of the {n} workers has {}", gb(largest.memory_bytes)),
        n => format!("the {n} workers have from {} ({}) to {} ({})", gb(smallest.memory_bytes), smallest.id, gb(largest.memory_bytes), largest.id),
    };
    let mut message = format!(
        "no replica fits: {each} of tp {} × ep {} × pp {} needs {} of weights ({}) + {} KV cache ({} blocks × {} tokens, f32) = {}, but {has}",
        want.tp,
        want.ep,
        want.pp,
        gb(w),
        weights_in_words(c, s),
        gb(kv),
        s.kv_blocks,
        s.block_size,
        gb(w + kv),
    );
    if workers.len() < want.world() {
        message.push_str(&format!(" (and {} worker(s) live for its {} ranks)", workers.len(), want.world()));
    }
    let fits_with = |s: &Sizing| !place(c, want, s, workers, &[]).is_empty();
    let mut would = Vec::new();
    // Other formats of the weights.
    let (dense, _) = dense_dtype(c, s);
    let mut formats: Vec<(String, Sizing)> = Vec::new();
    if dense.size_in_bytes() == 4 {
        let declared = c.checkpoint_dtype.as_deref().and_then(|d| d.parse::<DType>().ok()).filter(|d| d.size_in_bytes() == 2);
        match (s.dtype, declared) {
            (WeightDType::As(_), Some(_)) => formats.push(("--dtype auto".into(), Sizing { dtype: WeightDType::Auto, ..*s })),
            _ => formats.push(("--dtype bf16".into(), Sizing { dtype: WeightDType::As(DType::BF16), ..*s })),
        }
    }
    match s.quantization {
        Quantization::None if c.fp8_weights && !s.dummy() => formats.push(("--quantization auto".into(), Sizing { quantization: Quantization::Auto, ..*s })),
        Quantization::Auto | Quantization::None if !c.fp8_weights || s.dummy() => {
            formats.push(("--quantization int8".into(), Sizing { quantization: Quantization::Int8, ..*s }))
        }
        _ => {}
    }
    for (flag, sizing) in formats {
        if fits_with(&sizing) {
            let (w, kv) = rank_memory(c, want, &sizing);
            would.push(format!("{flag} ({} + {})", gb(w), gb(kv)));
        }
    }
    // A smaller KV cache: the most blocks that fit (fitting only grows as blocks shrink).
    if fits_with(&Sizing { kv_blocks: 1, ..*s }) {
        let (mut lo, mut hi) = (1, s.kv_blocks);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits_with(&Sizing { kv_blocks: mid, ..*s }) { lo = mid } else { hi = mid }
        }
        would.push(format!("--kv-blocks {lo}"));
    }
    // More workers like the largest: the fewest that hold one replica, and the layouts that do.
    for n in 2..=MAX_SUGGESTED_WORKERS {
        let cards: Vec<WorkerCard> = (0..n).map(|i| WorkerCard { id: format!("{}#{i}", largest.id), ..largest.clone() }).collect();
        let refs: Vec<&WorkerCard> = cards.iter().collect();
        let mut layouts: Vec<Layout> = layouts_of(n, want).into_iter().filter(|l| fits(c, l, s, &refs)).collect();
        if layouts.is_empty() {
            continue;
        }
        layouts.sort_by_key(|l| ([l.tp, l.ep, l.pp].iter().filter(|&&d| d > 1).count(), std::cmp::Reverse(l.tp), std::cmp::Reverse(l.ep)));
        let options: Vec<String> = layouts.iter().take(3).map(flags).collect();
        let like = if workers.iter().all(|w| w.memory_bytes == largest.memory_bytes) { String::new() } else { format!(" of {}", gb(largest.memory_bytes)) };
        would.push(format!("{n} workers{like} with {}", any_of(&options)));
        break;
    }
    if would.is_empty() {
        message.push_str(&format!("; nothing would fit: no other weight format, KV cache size or layout of up to {MAX_SUGGESTED_WORKERS} such workers"));
    } else {
        message.push_str(&format!("; would fit: {}", any_of(&would)));
    }
    message
}

/// The most workers a refusal's suggestions consider.
const MAX_SUGGESTED_WORKERS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        let json = r#"{"architectures":["MixtralForCausalLM"],"vocab_size":1000,"hidden_size":64,"intermediate_size":128,
          "num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"num_local_experts":4,"num_experts_per_tok":2}"#;
        ModelConfig::parse(json, "test".as_ref()).expect("config")
    }

    fn card(id: &str, memory_bytes: u64) -> WorkerCard {
        WorkerCard { id: id.into(), address: format!("{id}:1"), device: "cpu".into(), memory_bytes, version: "t".into(), pid: 0, restarts: 0 }
    }

    const SIZING: Sizing = Sizing {
        dtype: WeightDType::As(DType::F32),
        quantization: Quantization::None,
        load_format: LoadFormat::Safetensors,
        kv_blocks: 16,
        block_size: 16,
        redundant_experts: 0,
        rebalance_secs: 30,
    };

    fn tp(n: usize) -> Layout {
        Layout { tp: n, ..Layout::default() }
    }

    #[test]
    fn joins_add_replicas_and_keep_the_others_in_place() {
        let c = config();
        let one = plan(&c, &tp(1), &SIZING, &[card("a", 0)], &[]).unwrap();
        assert_eq!(one, vec![ReplicaPlan { layout: tp(1), workers: vec!["a".into()], copies: Vec::new() }]);
        let two = plan(&c, &tp(1), &SIZING, &[card("b", 0), card("a", 0)], &one).unwrap();
        assert_eq!(two[0], one[0], "the existing replica does not move");
        assert_eq!(two[1].workers, vec!["b".to_owned()]);
        let without_a = plan(&c, &tp(1), &SIZING, &[card("b", 0)], &two).unwrap();
        assert_eq!(without_a, vec![two[1].clone()]);
    }

    #[test]
    fn a_replica_that_loses_a_rank_shrinks_to_what_fits() {
        let c = config();
        let (w1, kv1) = rank_memory(&c, &tp(1), &SIZING);
        let (w2, kv2) = rank_memory(&c, &tp(2), &SIZING);
        assert!(w2 < w1 && kv2 < kv1, "two ranks hold less each");
        let big = w1 + kv1;
        let both = plan(&c, &tp(2), &SIZING, &[card("a", big), card("b", big)], &[]).unwrap();
        assert_eq!(both, vec![ReplicaPlan { layout: tp(2), workers: vec!["a".into(), "b".into()], copies: Vec::new() }]);
        let survivor = plan(&c, &tp(2), &SIZING, &[card("b", big)], &both).unwrap();
        assert_eq!(survivor, vec![ReplicaPlan { layout: tp(1), workers: vec!["b".into()], copies: Vec::new() }]);
        // Too small for the whole model: no capacity, and the message says how much is needed.
        let err = plan(&c, &tp(2), &SIZING, &[card("b", w2 + kv2)], &both).unwrap_err();
        assert!(err.starts_with("no replica fits: each rank of tp 2 × ep 1 × pp 1 needs"), "{err}");
        assert!(plan(&c, &tp(2), &SIZING, &[], &both).unwrap_err().contains("no live worker"));
    }

    #[test]
    fn three_workers_at_tp2_give_a_tp2_and_a_tp1_replica() {
        let c = config();
        let p = plan(&c, &tp(2), &SIZING, &[card("a", 0), card("b", 0), card("c", 0)], &[]).unwrap();
        assert_eq!(p.iter().map(|r| r.layout.world()).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(p[1].workers, vec!["c".to_owned()]);
    }

    #[test]
    fn at_most_the_wanted_replicas_are_placed_the_kept_ones_first() {
        let c = config();
        let four: Vec<WorkerCard> = ["a", "b", "c", "d"].iter().map(|id| card(id, 0)).collect();
        let all = plan(&c, &tp(2), &SIZING, &four, &[]).unwrap();
        assert_eq!(all.len(), 2);
        let one = plan_wanted(&c, &Wanted { layout: tp(2), replicas: 1 }, &SIZING, &four, &all[1..]).unwrap();
        assert_eq!(one, all[1..].to_vec(), "the kept replica stays, the other workers idle");
        let wider = plan_wanted(&c, &Wanted { layout: tp(4), replicas: 0 }, &SIZING, &four, &[]).unwrap();
        assert_eq!(wider, vec![ReplicaPlan { layout: tp(4), workers: vec!["a".into(), "b".into(), "c".into(), "d".into()], copies: Vec::new() }]);
    }

    #[test]
    fn a_worker_too_small_for_any_rank_is_passed_over() {
        let c = config();
        let (w, kv) = rank_memory(&c, &tp(2), &SIZING);
        let (big, small) = (w + kv, (w + kv) / 2);
        // "a" sorts first and holds no rank: "b" and "c" form the replica; "a" stays idle.
        let p = plan(&c, &tp(2), &SIZING, &[card("a", small), card("b", big), card("c", big)], &[]).unwrap();
        assert_eq!(p, vec![ReplicaPlan { layout: tp(2), workers: vec!["b".into(), "c".into()], copies: Vec::new() }]);
    }

    /// Mistral-7B's shape as a bf16 checkpoint.
    fn mistral_7b() -> ModelConfig {
        let c = ModelConfig::parse(cluster::config::MISTRAL_7B, "7b".as_ref()).expect("config");
        ModelConfig { checkpoint_dtype: Some("bfloat16".into()), ..c }
    }

    #[test]
    fn a_rank_needs_its_weights_as_kept_and_its_kv_cache() {
        let c = mistral_7b();
        let (h, layers) = (c.hidden_size as u64, c.num_hidden_layers as u64);
        let norms = (2 * layers + 1) * h;
        let params = c.num_parameters() as u64;
        let bf16 = Sizing { dtype: WeightDType::Auto, quantization: Quantization::Auto, kv_blocks: 1024, ..SIZING };
        let (w, kv) = rank_memory(&c, &tp(1), &bf16);
        assert_eq!(w, 2 * (params - norms) + 4 * norms, "bf16 as stored, norms in f32");
        let kv_per_token = layers * 2 * c.num_key_value_heads as u64 * c.head_dim as u64 * 4;
        assert_eq!(kv, 1024 * 16 * kv_per_token);
        let f32 = Sizing { dtype: WeightDType::As(DType::F32), ..bf16 };
        assert_eq!(rank_memory(&c, &tp(1), &f32).0, 4 * params);
        // int8: one byte per projection element and a 4-byte scale per row; the table stays bf16.
        let int8 = Sizing { quantization: Quantization::Int8, ..bf16 };
        let (vocab, table) = (c.vocab_size as u64, c.vocab_size as u64 * h);
        let (q, kvd, i) = ((c.num_attention_heads * c.head_dim) as u64, (c.num_key_value_heads * c.head_dim) as u64, c.intermediate_size as u64);
        let rows_per_layer = q + 2 * kvd + h + 2 * i + h;
        let projections = params - norms - 2 * table;
        assert_eq!(rank_memory(&c, &tp(1), &int8).0, projections + 4 * layers * rows_per_layer + 2 * table + table + 4 * vocab + 4 * norms);
        // Two ranks: each holds about half, and the KV heads split too.
        let (w2, kv2) = rank_memory(&c, &tp(2), &bf16);
        assert!(w2 < w / 2 + w / 100 && kv2 == kv / 2, "{w2} {kv2}");
        // Pipeline stages differ (the first holds the table, the last the lm_head and the final
        // norm): the largest is what a worker must hold.
        let pp = Layout { pp: 2, ..Layout::default() };
        let (first, last) = (rank_need(&c, &pp, 0, &bf16), rank_need(&c, &pp, 1, &bf16));
        assert_eq!(first.0 + last.0, w);
        assert_eq!(rank_memory(&c, &pp, &bf16), if first.0 >= last.0 { first } else { last });
        // Dummy weights of an FP8 checkpoint are dense.
        let fp8 = ModelConfig { fp8_weights: true, ..c.clone() };
        assert!(rank_memory(&fp8, &tp(1), &bf16).0 < w * 6 / 10);
        assert_eq!(rank_memory(&fp8, &tp(1), &Sizing { load_format: LoadFormat::Dummy, ..bf16 }).0, w);
    }

    /// `--redundant-experts N` sizes every rank of an expert-parallel Mixtral for ⌈N / ep⌉
    /// more experts a layer (each expert's three matrices, and the router a little wider).
    #[test]
    fn redundant_experts_are_sized_on_every_rank() {
        let c = ModelConfig::parse(cluster::config::MIX_BENCH, "mix-bench".as_ref()).expect("the mix-bench config parses");
        let s = Sizing { dtype: WeightDType::Auto, load_format: LoadFormat::Dummy, ..SIZING };
        let ep4 = Layout { tp: 1, ep: 4, pp: 1, stage_layers: Vec::new() };
        let (plain, _) = rank_memory(&c, &ep4, &s);
        let (five, _) = rank_memory(&c, &ep4, &Sizing { redundant_experts: 5, ..s });
        let expert = (3 * c.hidden_size * c.intermediate_size * c.num_hidden_layers * 4) as u64;
        let router = (4 * c.hidden_size * c.num_hidden_layers * 4) as u64;
        assert_eq!(five - plain, 2 * (expert + router), "two copies a layer on each of four ranks");
        // One expert-parallel rank has nothing to copy to.
        assert_eq!(rank_memory(&c, &tp(1), &Sizing { redundant_experts: 5, ..s }), rank_memory(&c, &tp(1), &s));
    }

    #[test]
    fn a_refusal_gives_the_arithmetic_and_what_would_fit() {
        let c = mistral_7b();
        let s = Sizing { dtype: WeightDType::Auto, quantization: Quantization::Auto, kv_blocks: 1024, ..SIZING };
        let (w, kv) = rank_memory(&c, &tp(1), &s);
        // A worker that holds the int8 weights and the KV cache, not the bf16 ones.
        let int8 = Sizing { quantization: Quantization::Int8, ..s };
        let (w8, kv8) = rank_memory(&c, &tp(1), &int8);
        let memory = w8 + kv8 + (1 << 20);
        assert!(memory < w, "not even the bf16 weights alone fit");
        let err = plan(&c, &tp(1), &s, &[card("worker-0", memory)], &[]).unwrap_err();
        let expected = format!(
            "no replica fits: each rank of tp 1 × ep 1 × pp 1 needs {} of weights (bf16 as stored) + {} KV cache (1024 blocks × 16 tokens, f32) = {}, but worker-0 has {}; would fit: --quantization int8 ({} + {}) or 2 workers with --tp 2 or --pp 2",
            gb(w),
            gb(kv),
            gb(w + kv),
            gb(memory),
            gb(w8),
            gb(kv8)
        );
        assert_eq!(err, expected);
        // Every suggestion fits, as the planner sees it.
        assert!(plan(&c, &tp(1), &int8, &[card("worker-0", memory)], &[]).is_ok());
        for l in [tp(2), Layout { pp: 2, ..Layout::default() }] {
            assert!(plan(&c, &l, &s, &[card("a", memory), card("b", memory)], &[]).is_ok(), "{l:?}");
        }

        // Room for the weights and part of the KV cache: the most blocks that fit.
        let memory = w + kv / 4 + 1000;
        let err = plan(&c, &tp(1), &s, &[card("w", memory)], &[]).unwrap_err();
        let blocks = (memory - w) / (kv / 1024);
        assert!(err.contains(&format!("--kv-blocks {blocks}")) && err.contains("--quantization int8"), "{err}");
        assert!(plan(&c, &tp(1), &Sizing { kv_blocks: blocks as usize, ..s }, &[card("w", memory)], &[]).is_ok());
        assert!(plan(&c, &tp(1), &Sizing { kv_blocks: blocks as usize + 1, ..s }, &[card("w", memory)], &[]).is_err());

        // f32 weights of a bf16 checkpoint: keeping them as stored fits.
        let f32 = Sizing { dtype: WeightDType::As(DType::F32), kv_blocks: 16, ..s };
        let err = plan(&c, &tp(1), &f32, &[card("w", w + (1 << 30))], &[]).unwrap_err();
        assert!(err.contains("needs") && err.contains("(f32)") && err.contains("--dtype auto ("), "{err}");

        // Workers of different sizes, too small for anything but many more of the largest.
        let err = plan(&c, &tp(1), &s, &[card("a", 2_000_000_000), card("b", 3_000_000_000)], &[]).unwrap_err();
        assert!(err.contains("but the 2 workers have from 2.00 GB (a) to 3.00 GB (b)"), "{err}");
        assert!(err.ends_with("; would fit: 8 workers of 3.00 GB with --tp 8, --pp 8 or --tp 4 --pp 2"), "{err}");
        let like_b = |n: usize| (0..n).map(|i| card(&format!("b{i}"), 3_000_000_000)).collect::<Vec<_>>();
        for l in [tp(8), Layout { pp: 8, ..Layout::default() }, Layout { tp: 4, pp: 2, ..Layout::default() }] {
            assert!(plan(&c, &l, &s, &like_b(8), &[]).is_ok_and(|p| p.len() == 1 && p[0].layout == l), "{l:?}");
        }
        assert!(layouts_of(7, &tp(1)).iter().all(|l| plan(&c, l, &s, &like_b(7), &[]).is_err()), "7 are too few");
        let tiny = plan(&c, &tp(1), &s, &[card("a", 1000)], &[]).unwrap_err();
        assert!(tiny.ends_with("; nothing would fit: no other weight format, KV cache size or layout of up to 64 such workers"), "{tiny}");
    }
}
