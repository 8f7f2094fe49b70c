//! The inference engine: one scheduler thread owns the model and runs continuous batching.
//!
//! Requests arrive through [`EngineHandle::submit`] and wait in a bounded queue. Every step the
//! scheduler drops sequences whose client went away, admits waiting sequences up to
//! `max_batch_size`, and runs ONE batched forward over all running sequences: prompt chunks for
//! sequences still prefilling (bounded per step so running streams keep flowing) and one token for
//! each decoding sequence, each row group with its own LoRA stack. It samples, streams events back
//! through each sequence's channel and retires finished sequences.
//!
//! With a KV budget, KV memory is a pool of fixed-size blocks (`kv_blocks`): sequences take
//! blocks as they grow, and when the pool runs dry mid-generation the newest sequence is
//! preempted (its blocks freed) and later recomputed from its history, instead of anything
//! failing.

mod admission;
mod kv_blocks;
mod kv_memory;
mod metrics;
mod prefix_cache;
mod running;
mod scheduler;
mod vllm_metrics;

pub use kv_blocks::{KvBlocks, BLOCK_POSITIONS};
pub use metrics::EngineMetrics;

use crate::generate::{FinishReason, GenerationParams};
use crate::lora::LoraStack;
use crate::model::LoadedModel;
use crate::sampling::TokenLogprob;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc as tmpsc;

/// Limits of the scheduler.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Most sequences in one forward step.
    pub max_batch_size: usize,
    /// Most sequences waiting for a batch slot; beyond it submissions are refused.
    pub max_waiting: usize,
    /// Most prompt tokens prefilled in one step (over all sequences).
    pub prefill_chunk: usize,
    /// Byte budget of all running sequences' KV caches (`None`: unlimited), managed as blocks of
    /// [`BLOCK_POSITIONS`] positions ([`KvBlocks`]). A sequence is admitted when its prompt's
    /// blocks are free and gains blocks as it grows; when none are left, the newest sequence is
    /// preempted and recomputed later. One whose prompt plus `max_tokens` could never fit is
    /// refused at submission.
    pub kv_budget_bytes: Option<usize>,
    /// Byte cap of the prefix cache (0: off): the keys and values of prompts and finished
    /// sequences, reused by later prompts that start the same way under the same adapters.
    pub prefix_cache_bytes: usize,
    /// With a KV budget: keep every sequence's keys and values in one paged pool of its blocks
    /// (`model::KvPool`, allocated at start on the model's device), read by the decode step
    /// through block tables, and the prefix cache's entries in blocks of the same pool. Without
    /// it, each sequence keeps its own buffers, capped at its blocks.
    pub paged_kv: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_waiting: 256,
            prefill_chunk: 256,
            kv_budget_bytes: None,
            prefix_cache_bytes: 1 << 30,
            paged_kv: false,
        }
    }
}

/// One sequence to generate.
pub struct EngineRequest {
    pub prompt_ids: Vec<u32>,
    pub params: GenerationParams,
    pub lora: Option<Arc<LoraStack>>,
    /// Label for metrics and logs (`base`, an adapter name, or a stack label).
    pub label: String,
    /// Score the prompt too (completions' `echo` with `logprobs`): each prompt token's
    /// log-probability under the tokens before it, with this many alternatives; sent as one
    /// [`EngineEvent::PromptLogprobs`] when the prefill completes.
    pub prompt_logprobs: Option<usize>,
    /// Stop when the prefill completes, generating nothing (`echo` with `max_tokens: 0`: score
    /// a text). `params.max_tokens` still bounds the KV reservation.
    pub prompt_only: bool,
}

/// One prompt token and, from the second on, its log-probability and top alternatives.
pub type PromptLogprob = (u32, Option<(TokenLogprob, Vec<TokenLogprob>)>);

/// What a sequence reports back.
#[derive(Clone, Debug)]
pub enum EngineEvent {
    /// One generated token and the text that became final with it (may be empty).
    Token {
        id: u32,
        text: String,
        logprob: Option<(TokenLogprob, Vec<TokenLogprob>)>,
    },
    /// Every prompt token's log-probability (first: none), once, before the first token.
    PromptLogprobs(Vec<PromptLogprob>),
    /// The sequence ended.
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens whose keys and values came from the prefix cache.
        cached_tokens: usize,
    },
    /// The sequence failed (internal error); no more events follow.
    Error(String),
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("too many requests are waiting ({0}); retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error(
        "the prompt plus max_tokens needs {need} bytes of KV cache, more than the {budget} bytes \
         of KV blocks the server's whole KV budget holds; shorten the prompt or lower max_tokens"
    )]
    KvTooLarge { need: usize, budget: usize },
}

/// Positions a sequence may fill: its prompt plus `max_tokens`, within the model's context.
pub fn kv_positions(model: &LoadedModel, req: &EngineRequest) -> usize {
    (req.prompt_ids.len() + req.params.max_tokens).min(model.llama.max_context())
}

/// Bytes of KV cache one position takes (keys and values of every layer, in the model's dtype).
pub fn kv_bytes_per_position(model: &LoadedModel) -> usize {
    let c = &model.llama.cfg;
    2 * c.num_hidden_layers
        * c.num_key_value_heads
        * c.head_dim
        * model.llama.dtype().size_in_bytes()
}

pub(crate) struct Submission {
    req: EngineRequest,
    events: tmpsc::UnboundedSender<EngineEvent>,
    submitted: Instant,
}

/// Cheap, cloneable handle to the scheduler thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Submission>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    /// Positions the KV budget's blocks hold (`None`: no budget).
    kv_capacity: Option<usize>,
    model: Arc<LoadedModel>,
}

impl EngineHandle {
    /// Starts the scheduler thread for `model`.
    pub fn start(model: Arc<LoadedModel>, cfg: EngineConfig, metrics: Arc<EngineMetrics>) -> Self {
        let pool = cfg
            .kv_budget_bytes
            .map(|b| KvBlocks::for_budget(b, kv_bytes_per_position(&model)));
        if let Some(p) = &pool {
            metrics.kv_blocks_total.set(p.total() as i64);
        }
        // The paged storage is allocated here, before anything is served, so that its gauges
        // are set when the caller goes on.
        let paged = match (&pool, cfg.paged_kv) {
            (Some(blocks), true) => scheduler::paged_storage(&model, blocks.total()),
            _ => None,
        };
        metrics.kv_paged.set(i64::from(paged.is_some()));
        let pool_bytes = paged.as_ref().map_or(0, |p| p.blocks() * p.block_bytes());
        metrics.kv_pool_bytes.set(pool_bytes as i64);
        // On a GPU each host thread queues work on its own stream: the weights and the pool
        // were uploaded from this one, and the scheduler thread must not read them before the
        // copies are done.
        if let Err(e) = model.llama.device().synchronize() {
            tracing::error!("waiting for the model's uploads: {e}");
        }
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let handle = Self {
            tx,
            waiting: waiting.clone(),
            max_waiting: cfg.max_waiting,
            kv_capacity: pool.as_ref().map(KvBlocks::capacity_positions),
            model: model.clone(),
        };
        std::thread::Builder::new()
            .name("loraplex-scheduler".into())
            .spawn(move || scheduler::run(model, cfg, pool, paged, rx, waiting, metrics))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the scheduler thread: {e}"));
        handle
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Queues a sequence; events arrive on the returned receiver. Dropping the receiver cancels
    /// the sequence within one step.
    pub fn submit(
        &self,
        req: EngineRequest,
    ) -> Result<tmpsc::UnboundedReceiver<EngineEvent>, SubmitError> {
        if let Some(pool) = self.kv_capacity {
            let per_position = kv_bytes_per_position(&self.model);
            let positions = kv_positions(&self.model, &req);
            if positions > pool {
                return Err(SubmitError::KvTooLarge {
                    need: positions * per_position,
                    budget: pool * per_position,
                });
            }
        }
        let n = self.waiting.fetch_add(1, Ordering::SeqCst);
        if n >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(n));
        }
        let (etx, erx) = tmpsc::unbounded_channel();
        let sub = Submission {
            req,
            events: etx,
            submitted: Instant::now(),
        };
        if self.tx.send(sub).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Stopped);
        }
        Ok(erx)
    }

    /// Positions the whole KV budget holds (`None`: no budget): the most one sequence's prompt
    /// plus `max_tokens` may take.
    pub fn kv_capacity(&self) -> Option<usize> {
        self.kv_capacity
    }

    /// Sequences waiting for a batch slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}
