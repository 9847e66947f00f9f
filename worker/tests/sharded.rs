//! Sharded replicas over real worker processes linked by the TCP communicator: every layout
//! (tensor, expert and pipeline parallel, and their combinations) must reproduce the
//! transformers reference, prefill and greedy decode, with all four prompts in one batch.
//! Mixtral's ranks count the tokens each expert ran: every layout counts the same ones, each
//! layer `top_k` per token. A killed rank makes its peers fail the step within seconds, never
//! hang.

mod common;

use std::time::{Duration, Instant};

use common::{WorkerProcess, fixture, reference};
use pb::worker_client::WorkerClient;
use proto::tramontane::worker::v1 as pb;
use tonic::Code;
use tonic::transport::Channel;
use worker::experts::ExpertLoad;

const TOL: f32 = 2e-3;

#[derive(Debug, Clone, Copy)]
struct Layout {
    tp: u32,
    ep: u32,
    pp: u32,
    stage_layers: &'static [u32],
}

const fn layout(tp: u32, ep: u32, pp: u32) -> Layout {
    Layout { tp, ep, pp, stage_layers: &[] }
}

struct Cluster {
    workers: Vec<WorkerProcess>,
    clients: Vec<WorkerClient<Channel>>,
    comm: Vec<String>,
    epoch: u64,
    /// The epoch the loaded replica was formed in.
    formed: u64,
    /// Redundant experts of the next assignments.
    copies: Vec<pb::ExpertCopy>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        let workers: Vec<WorkerProcess> = (0..n).map(|_| WorkerProcess::start()).collect();
        let mut clients = Vec::new();
        let mut comm = Vec::new();
        for w in &workers {
            let mut c = WorkerClient::connect(w.url()).await.expect("connects");
            comm.push(c.health(pb::HealthRequest {}).await.expect("health").into_inner().comm_address);
            clients.push(c);
        }
        Cluster { workers, clients, comm, epoch: 0, formed: 0, copies: Vec::new() }
    }

    fn request(&self, model: &str, l: Layout, rank: usize) -> pb::LoadAssignmentRequest {
        let world = (l.tp * l.ep * l.pp) as usize;
        pb::LoadAssignmentRequest {
            epoch: self.epoch,
            model_path: fixture(model).display().to_string(),
            dtype: pb::WeightDtype::F32 as i32,
            kv_blocks: 32,
            block_size: 16,
            tp: l.tp,
            ep: l.ep,
            pp: l.pp,
            stage_layers: l.stage_layers.to_vec(),
            rank: rank as u32,
            peers: self.comm[..world].to_vec(),
            formed: self.formed,
            expert_copies: self.copies.clone(),
            ..Default::default()
        }
    }

    /// Loads `model` with layout `l` on the first ranks, in a new epoch.
    async fn load(&mut self, model: &str, l: Layout) -> Result<(), tonic::Status> {
        self.formed = self.epoch + 1;
        self.reassign(model, l).await.map(drop)
    }

    /// Sends the loaded replica's ranks their assignments again in a new epoch (with the
    /// current `copies`); whether each kept its model.
    async fn reassign(&mut self, model: &str, l: Layout) -> Result<Vec<bool>, tonic::Status> {
        self.epoch += 1;
        let world = (l.tp * l.ep * l.pp) as usize;
        let calls = (0..world).map(|r| {
            let mut c = self.clients[r].clone();
            let req = self.request(model, l, r);
            async move { c.load_assignment(req).await.map(|r| r.into_inner().kept) }
        });
        join_all(calls).await.into_iter().collect()
    }

    /// Sends one step to every rank and returns the driver's results, with every rank's expert
    /// counts.
    async fn step(&self, l: Layout, sequences: Vec<pb::SequenceStep>) -> Result<(Vec<pb::SequenceResult>, Vec<pb::ExpertTokens>), tonic::Status> {
        let world = (l.tp * l.ep * l.pp) as usize;
        let driver = world - (l.tp * l.ep) as usize;
        let calls = (0..world).map(|r| {
            let mut c = self.clients[r].clone();
            let req = pb::StepRequest { epoch: self.epoch, sequences: sequences.clone(), released: vec![] };
            async move { c.step(req).await.map(tonic::Response::into_inner) }
        });
        let mut experts = Vec::new();
        let mut results = None;
        for (r, res) in join_all(calls).await.into_iter().enumerate() {
            let mut res = res?;
            if r != driver {
                assert!(res.results.is_empty(), "only the driver answers");
            }
            experts.append(&mut res.expert_tokens);
            if r == driver {
                results = Some(res.results);
            }
        }
        Ok((results.expect("the driver answered"), experts))
    }
}

/// Runs the calls concurrently (one task each) and returns their results in order.
async fn join_all<T: Send + 'static>(calls: impl Iterator<Item = impl Future<Output = T> + Send + 'static>) -> Vec<T> {
    let tasks: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("call task"));
    }
    out
}

fn greedy() -> Option<pb::Sampling> {
    Some(pb::Sampling { top_p: 1.0, logprobs: 1, ..Default::default() })
}

/// What a run of the reference cases computed.
struct Run {
    /// The worst logprob error.
    worst: f32,
    /// The tokens each expert ran, summed over the ranks' counts.
    experts: ExpertLoad,
    /// The tokens the steps carried.
    tokens: u64,
    /// Every step's sampled tokens and logprobs (as bits), and prompt logprobs.
    outputs: Vec<(u32, u32)>,
}

/// All the fixture's prompts in one batch (prefill with prompt logprobs), then greedy
/// decoding together.
async fn check_reference(cluster: &Cluster, model: &str, l: Layout) -> Run {
    let config = worker::ModelConfig::from_file(&fixture(model).join("config.json")).expect("config");
    let mut experts = ExpertLoad::new(config.num_hidden_layers, config.num_local_experts, l.ep as usize);
    let mut tokens = 0;
    let mut outputs = Vec::new();
    let cases = &reference(model).cases;
    let table = |i: usize| (i as u32 * 4..i as u32 * 4 + 4).collect::<Vec<u32>>();
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); cases.len()];
    let mut worst = 0f32;
    for step in 0..cases[0].greedy_ids.len() {
        let sequences = cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (tokens, start_pos) = match generated[i].last() {
                    None => (c.prompt_ids.clone(), 0),
                    Some(&t) => (vec![t], (c.prompt_ids.len() + step - 1) as u32),
                };
                let prompt_logprobs = (step == 0).then_some(1);
                pb::SequenceStep {
                    seq_id: i as u64,
                    tokens,
                    start_pos,
                    block_table: table(i),
                    sampling: greedy(),
                    prompt_logprobs,
                    keep_history: None,
                    embed: 0,
                    grammar: None,
                    history: vec![],
                }
            })
            .collect::<Vec<pb::SequenceStep>>();
        tokens += sequences.iter().map(|s| s.tokens.len() as u64).sum::<u64>();
        let (results, counts) = cluster.step(l, sequences).await.unwrap_or_else(|e| panic!("{model} {l:?}: step {step}: {e:?}"));
        for c in counts {
            experts.add(c.layer as usize, c.ep_rank as usize, &c.tokens).unwrap_or_else(|e| panic!("{model} {l:?}: {e}"));
        }
        assert_eq!(results.len(), cases.len());
        for (i, r) in results.iter().enumerate() {
            let c = &cases[i];
            let prompt_logprobs = if step == 0 { c.prompt_ids.len() - 1 } else { 0 };
            assert_eq!(r.prompt_logprobs.len(), prompt_logprobs, "{model} {l:?}: case {i} step {step}: prompt logprobs");
            for (p, lp) in r.prompt_logprobs.iter().enumerate() {
                outputs.push((lp.token_id, lp.logprob.to_bits()));
                assert_eq!(lp.token_id, c.prompt_ids[p + 1]);
                worst = worst.max((lp.logprob - c.prompt_logprobs[p + 1].expect("logprob")).abs());
            }
            let s = r.sampled.as_ref().expect("sampled");
            outputs.push((s.token_id, s.logprob.to_bits()));
            assert_eq!(s.token_id, c.greedy_ids[step], "{model} {l:?}: case {i} greedy token {step}");
            worst = worst.max((s.logprob - c.greedy_logprobs[step]).abs());
            generated[i].push(s.token_id);
        }
    }
    assert!(worst <= TOL, "{model} {l:?}: logprob error {worst} > {TOL}");
    Run { worst, experts, tokens, outputs }
}

/// A Mixtral run's expert counts: each layer ran `num_experts_per_tok` experts per token of
/// the steps, and every layout of a model counted the same tokens for each expert as its
/// first layout did (`seen`, by model). Dense models count nothing.
fn check_expert_counts(model: &str, l: Layout, run: Run, seen: &mut std::collections::HashMap<String, ExpertLoad>) {
    let config = worker::ModelConfig::from_file(&fixture(model).join("config.json")).expect("config");
    if config.architecture != worker::Architecture::Mixtral {
        assert_eq!(run.experts.total(), 0, "{model} {l:?}: a dense model counted experts");
        return;
    }
    for (layer, counts) in run.experts.tokens.iter().enumerate() {
        let routed: u64 = counts.iter().sum();
        assert_eq!(routed, run.tokens * config.num_experts_per_tok as u64, "{model} {l:?}: layer {layer} counted {counts:?}");
    }
    match seen.get(model) {
        Some(first) => assert_eq!(run.experts.tokens, first.tokens, "{model} {l:?}: the experts ran other tokens than in its first layout"),
        None => {
            eprintln!("{model}: tokens per expert, layer 0: {:?}", run.experts.tokens[0]);
            seen.insert(model.to_owned(), run.experts);
        }
    }
}

#[tokio::test]
async fn every_layout_reproduces_the_reference() {
    let mut cluster = Cluster::start(4).await;
    let mut expert_loads = std::collections::HashMap::new();
    let runs: &[(&str, Layout)] = &[
        // Tensor parallel, down to one KV head shared by 4 ranks (tp > num_key_value_heads).
        ("mistral-v1-tiny", layout(2, 1, 1)),
        ("mistral-v1-tiny", layout(4, 1, 1)),
        ("mistral-nemo-tiny", layout(2, 1, 1)),
        ("mixtral-f32-tiny", layout(4, 1, 1)),
        // Expert parallel: 8 experts over 2 and 4 ranks; 6 experts over 4 (uneven: 2, 2, 1, 1).
        ("mixtral-v3-tiny", layout(1, 2, 1)),
        ("mixtral-v3-tiny", layout(1, 4, 1)),
        ("mixtral-f32-tiny", layout(1, 4, 1)),
        // Pipeline parallel: even, uneven by default (2 + 1), and an explicit uneven split.
        ("mistral-v1-tiny", layout(1, 1, 2)),
        ("mistral-nemo-tiny", layout(1, 1, 3)),
        ("mixtral-f32-tiny", layout(1, 1, 2)),
        ("mistral-nemo-tiny", Layout { tp: 1, ep: 1, pp: 2, stage_layers: &[1, 2] }),
        // Combinations.
        ("mixtral-v3-tiny", layout(2, 2, 1)),
        ("mixtral-f32-tiny", layout(2, 2, 1)),
        ("mistral-nemo-tiny", layout(2, 1, 2)),
        ("mixtral-f32-tiny", layout(1, 2, 2)),
        // FP8 checkpoints: values and their per-channel (Mistral) or per-tensor (Mixtral)
        // scales sliced with the rows; a slice of columns keeps its rows' scales.
        ("mistral-fp8-tiny", layout(2, 1, 1)),
        ("mistral-fp8-tiny", layout(1, 1, 2)),
        ("mixtral-fp8-tiny", layout(1, 2, 1)),
        ("mixtral-fp8-tiny", layout(2, 2, 1)),
    ];
    for &(model, l) in runs {
        cluster.load(model, l).await.unwrap_or_else(|e| panic!("{model} {l:?}: {e:?}"));
        // Slice loading: a rank of a tensor-parallel layout holds about 1/tp of the weights.
        if l.ep == 1 && l.pp == 1 {
            let config = worker::ModelConfig::from_file(&fixture(model).join("config.json")).expect("config");
            let full = (config.num_parameters() * 4) as f64;
            for c in &cluster.clients[..l.tp as usize] {
                let held = c.clone().health(pb::HealthRequest {}).await.expect("health").into_inner().weight_bytes as f64;
                assert!(held <= full / l.tp as f64 * 1.05, "{model} {l:?}: a rank holds {held} of {full} bytes");
            }
        }
        let run = check_reference(&cluster, model, l).await;
        let worst = run.worst;
        eprintln!("{model} tp={} ep={} pp={} {:?}: worst logprob error {worst:.2e}", l.tp, l.ep, l.pp, l.stage_layers);
        check_expert_counts(model, l, run, &mut expert_loads);
    }
    // Layouts that do not fit the model are refused with the reason.
    for (model, l, what) in [
        ("mistral-v1-tiny", layout(3, 1, 1), "attention heads"),
        ("mistral-v1-tiny", layout(1, 2, 1), "mixture of experts"),
        ("mixtral-v3-tiny", layout(1, 1, 3), "layers"),
        ("mistral-nemo-tiny", Layout { tp: 1, ep: 1, pp: 2, stage_layers: &[2, 2] }, "stage layers"),
    ] {
        let err = cluster.load(model, l).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(what), "{}", err.message());
    }
}

/// Redundant experts placed from the load a run observed (`place_copies`, as the coordinator
/// places them), applied in place to a loaded EP-4 replica: the same run gives the same bits,
/// the experts run the same tokens, the copies take their share and the ranks' imbalance
/// drops; taking the copies away restores the weights held.
#[tokio::test]
async fn redundant_experts_change_no_output_and_take_their_share() {
    let mut cluster = Cluster::start(4).await;
    let (model, l) = ("mixtral-v3-tiny", layout(1, 4, 1));
    cluster.load(model, l).await.expect("loads");
    let held = |c: &Cluster| {
        let clients = c.clients.clone();
        async move {
            let mut bytes = Vec::new();
            for mut c in clients {
                bytes.push(c.health(pb::HealthRequest {}).await.expect("health").into_inner().weight_bytes);
            }
            bytes
        }
    };
    let before = held(&cluster).await;
    let plain = check_reference(&cluster, model, l).await;
    let copies = worker::experts::place_copies(&plain.experts, 4);
    assert_eq!(copies.len(), 4 * plain.experts.tokens.len(), "four copies a layer: {copies:?}");
    cluster.copies = copies.iter().map(|&(layer, expert, rank)| pb::ExpertCopy { layer: layer as u32, expert: expert as u32, ep_rank: rank as u32 }).collect();
    assert_eq!(cluster.reassign(model, l).await.expect("copies applied"), vec![true; 4], "in place: every rank kept its model");
    let with_copies = held(&cluster).await;
    assert!(with_copies.iter().zip(&before).all(|(w, b)| w > b), "every rank holds copies: {with_copies:?} vs {before:?}");

    let balanced = check_reference(&cluster, model, l).await;
    assert_eq!(balanced.outputs, plain.outputs, "the copies change no token or logprob bit");
    assert_eq!(balanced.experts.tokens, plain.experts.tokens, "the router chose the same experts");
    // The ranks ran every token once between them, and not as their own experts' shares.
    for (layer, (now, was)) in balanced.experts.ranks.iter().zip(&plain.experts.ranks).enumerate() {
        assert_eq!(now.iter().sum::<u64>(), was.iter().sum::<u64>(), "layer {layer}");
        assert_ne!(now, was, "layer {layer}: the copies ran some tokens");
    }
    let (was, now) = (plain.experts.imbalance().expect("tokens"), balanced.experts.imbalance().expect("tokens"));
    eprintln!("EP-4 imbalance {was:.3} without copies, {now:.3} with 4 a layer");
    assert!(now < was, "copies of the hottest experts balance the ranks: {now} vs {was}");

    cluster.copies.clear();
    assert_eq!(cluster.reassign(model, l).await.expect("copies dropped"), vec![true; 4]);
    assert_eq!(held(&cluster).await, before, "the copies' weights are dropped");
    assert_eq!(check_reference(&cluster, model, l).await.outputs, plain.outputs);

    // A copy on the expert's owner, or of an expert the model lacks, is refused.
    for (expert, ep_rank) in [(0, 0), (8, 1)] {
        cluster.copies = vec![pb::ExpertCopy { layer: 0, expert, ep_rank }];
        let err = cluster.reassign(model, l).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("expert_copies"), "{}", err.message());
    }
}

#[tokio::test]
async fn a_killed_rank_fails_its_peers_step_within_seconds() {
    let mut cluster = Cluster::start(2).await;
    let l = layout(2, 1, 1);
    cluster.load("mixtral-f32-tiny", l).await.expect("loads");
    check_reference(&cluster, "mixtral-f32-tiny", l).await;

    // Rank 0 enters a step and waits for rank 1 in its first collective; rank 1 dies.
    let mut rank0 = cluster.clients[0].clone();
    let seq = pb::SequenceStep {
        seq_id: 1,
        tokens: vec![1, 2, 3],
        start_pos: 0,
        block_table: vec![0],
        sampling: greedy(),
        prompt_logprobs: None,
        keep_history: None,
        embed: 0,
        grammar: None,
        history: vec![],
    };
    let req = pb::StepRequest { epoch: cluster.epoch, sequences: vec![seq], released: vec![] };
    let pending = tokio::spawn(async move { rank0.step(req).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    let victim = &mut cluster.workers[1];
    victim.child.kill().expect("kill -9");
    victim.child.wait().expect("reaped");
    let result = tokio::time::timeout(Duration::from_secs(10), pending).await.expect("no hang").expect("task");
    let took = killed.elapsed();
    let err = result.expect_err("the step cannot complete without rank 1");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("rank 1"), "{}", err.message());
    assert!(took < Duration::from_secs(5), "error after {took:?}");
    eprintln!("rank 0 failed its step {took:?} after rank 1 was killed: {}", err.message());

    // The survivor keeps serving: it takes a new assignment (the whole model) and is correct.
    cluster.load("mixtral-f32-tiny", layout(1, 1, 1)).await.expect("reassigned");
    check_reference(&cluster, "mixtral-f32-tiny", layout(1, 1, 1)).await;
}

#[tokio::test]
async fn a_replica_formed_anew_of_the_same_ranks_links_afresh() {
    let mut cluster = Cluster::start(2).await;
    let l = layout(2, 1, 1);
    cluster.load("mistral-v1-tiny", l).await.expect("loads");
    check_reference(&cluster, "mistral-v1-tiny", l).await;

    // Only rank 1 saw the replica fail (as when the link between them vanishes: the rank
    // that timed out unloads, the other may not have been in a collective), and the next
    // placement forms the replica again of the same workers in the same ranks.
    let mut rank1 = cluster.clients[1].clone();
    rank1.fence(pb::FenceRequest { epoch: cluster.epoch + 1 }).await.expect("rank 1 unloads");
    cluster.epoch += 1;

    // The same assignment for a newer epoch, but formed anew: rank 0 must drop its old link
    // and link again with rank 1, rather than keep it as a move of a kept replica would.
    let load = tokio::time::timeout(Duration::from_secs(20), cluster.load("mistral-v1-tiny", l)).await.expect("no hang");
    load.expect("both ranks link afresh");
    check_reference(&cluster, "mistral-v1-tiny", l).await;
}
