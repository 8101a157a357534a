//! `Agent`: one actor per (room, persona) on the node that committed the trigger, so one trigger
//! runs one job in the whole cluster. The Room sends it `Enqueue` for each trigger it committed
//! and `CancelJob` when someone allowed to asked to stop; the Agent answers one trigger at a time
//! (the others wait in a queue the room can see), streams the answer's text to the Room as
//! deltas (the Room fans them out to every member on every node), checkpoints the text so far,
//! and commits `ai.started` / `ai.completed` (or `ai.failed` / `ai.cancelled`) through the Room.
//! Cancelling drops the provider stream, which aborts the upstream HTTP request at once.
//! It stops itself when idle.

pub mod budget;
pub mod context;
pub mod tools;
pub mod trigger;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{TimeZone, Utc};
use futures_util::StreamExt;

pub use budget::TriggerLimiter;

use crate::event::{AgentInfo, Author, AuthorKind, Message, Usage};
use crate::ids::{MessageId, RoomId, UserId};
use crate::llm::{ChatMessage, ChatRequest, LlmError, LlmProvider, StreamItem};
use crate::ports::{AnswerOutcome, Command, Store};
use crate::protocol::{QueuedTrigger, UsageReport};
use crate::room::{
    AgentDelta, AgentQueue, AgentSnapshot, AgentStopped, AgentUsage, AgentWrite, Room,
};
use crate::time::Timestamp;

/// What agents answer when no provider is configured.
pub const NOT_CONFIGURED: &str = "AI is not configured on this server. An operator can enable \
    answers by setting AI_PROVIDER (deepseek, openai, gemini, ollama, vllm, llamacpp or \
    openai-compatible) and AI_API_KEY.";

/// How far back a thread (reply chain) is followed.
const THREAD_DEPTH: usize = 5;

#[derive(Clone, Debug)]
pub struct AiConfig {
    /// The model's context budget in tokens (the request never exceeds it).
    pub context_tokens: usize,
    /// Tokens kept for the answer (and asked for as `max_tokens`).
    pub answer_tokens: u32,
    /// Most recent messages considered for the context.
    pub history_messages: u32,
    /// Rounds of tool calls per answer.
    pub tool_steps: usize,
    /// How often the text so far is checkpointed to the store / re-sent whole to other nodes.
    pub checkpoint_every: Duration,
    pub triggers_per_min_user: u32,
    pub triggers_per_min_room: u32,
    pub tokens_per_day_user: u64,
    pub tokens_per_day_room: u64,
    pub idle_timeout: Duration,
    /// An answer with no sign of life (delta, snapshot) for this long is ended as
    /// `agent_lost` by any node (its writer died); longer than the provider's timeouts.
    pub stale_answer_after: Duration,
}

impl Default for AiConfig {
    fn default() -> Self {
        Self {
            context_tokens: 8000,
            answer_tokens: 1024,
            history_messages: 200,
            tool_steps: 3,
            checkpoint_every: Duration::from_millis(500),
            triggers_per_min_user: 10,
            triggers_per_min_room: 30,
            tokens_per_day_user: 200_000,
            tokens_per_day_room: 1_000_000,
            idle_timeout: Duration::from_secs(30),
            stale_answer_after: Duration::from_secs(180),
        }
    }
}

/// What agents need from their node.
#[derive(Clone)]
pub struct AiDeps {
    pub store: Arc<dyn Store>,
    /// `None`: answers are the "not configured" notice.
    pub provider: Option<Arc<dyn LlmProvider>>,
    pub config: AiConfig,
    pub limiter: Arc<TriggerLimiter>,
}

/// A trigger to answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub trigger_message_id: MessageId,
    pub trigger_author: UserId,
    /// Who pays the tokens (the trigger's author, or whoever asked to regenerate).
    pub charge_to: UserId,
}

/// The answer being written, shared between the streaming task and the actor (which needs the
/// text when it cancels the task).
#[derive(Default)]
struct Progress {
    text: Mutex<String>,
    chars: Mutex<usize>,
    started: AtomicBool,
    usage: Mutex<Usage>,
}

impl Progress {
    fn text(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn usage(&self) -> Usage {
        self.usage.lock().map(|u| *u).unwrap_or_default()
    }

    /// Appends a delta and returns its offset in characters.
    fn push(&self, delta: &str) -> usize {
        let (Ok(mut text), Ok(mut chars)) = (self.text.lock(), self.chars.lock()) else {
            return 0;
        };
        let offset = *chars;
        text.push_str(delta);
        *chars += delta.chars().count();
        offset
    }
}

struct Running {
    job: Job,
    message_id: MessageId,
    handle: Option<SpawnHandle>,
    progress: Arc<Progress>,
}

pub struct Agent {
    room_id: RoomId,
    info: AgentInfo,
    room: Addr<Room>,
    deps: AiDeps,
    queue: VecDeque<Job>,
    current: Option<Running>,
    last_activity: Instant,
}

impl Agent {
    pub fn new(room_id: RoomId, info: AgentInfo, room: Addr<Room>, deps: AiDeps) -> Self {
        Self {
            room_id,
            info,
            room,
            deps,
            queue: VecDeque::new(),
            current: None,
            last_activity: Instant::now(),
        }
    }

    fn publish_queue(&self) {
        let queue = self
            .queue
            .iter()
            .enumerate()
            .map(|(index, job)| QueuedTrigger {
                trigger_message_id: job.trigger_message_id.clone(),
                trigger_author: job.trigger_author.clone(),
                position: index + 1,
            })
            .collect();
        self.room.do_send(AgentQueue {
            agent: self.info.name.clone(),
            queue,
        });
    }

    fn try_start(&mut self, ctx: &mut Context<Self>) {
        self.last_activity = Instant::now();
        if self.current.is_some() {
            return;
        }
        let Some(job) = self.queue.pop_front() else {
            return;
        };
        self.publish_queue();
        let message_id = MessageId::random();
        let progress = Arc::new(Progress::default());
        let task = answer(
            self.deps.clone(),
            self.room.clone(),
            self.room_id.clone(),
            self.info.clone(),
            job.clone(),
            message_id.clone(),
            progress.clone(),
        );
        let handle = ctx.spawn(task.into_actor(self).map(|(), agent, ctx| {
            agent.current = None;
            agent.report_usage(ctx);
            agent.try_start(ctx);
        }));
        self.current = Some(Running {
            job,
            message_id,
            handle: Some(handle),
            progress,
        });
    }

    fn report_usage(&self, ctx: &mut Context<Self>) {
        let store = self.deps.store.clone();
        let room = self.room_id.clone();
        let limit = self.deps.config.tokens_per_day_room;
        let addr = self.room.clone();
        ctx.spawn(
            async move {
                let (day, since) = utc_day();
                if let Ok(totals) = store.room_usage(&room, since).await {
                    addr.do_send(AgentUsage {
                        usage: UsageReport {
                            day,
                            prompt_tokens: totals.prompt_tokens,
                            completion_tokens: totals.completion_tokens,
                            answers: totals.answers,
                            tokens_per_day_limit: limit,
                        },
                    });
                }
            }
            .into_actor(self),
        );
    }

    /// Checks the trigger budgets; a refused trigger is answered with `ai.failed` right away.
    fn admit(&mut self, job: Job, ctx: &mut Context<Self>) {
        let config = &self.deps.config;
        let user_key = format!("user:{}", job.charge_to);
        let room_key = format!("room:{}", self.room_id);
        let keys = [
            (user_key.as_str(), config.triggers_per_min_user),
            (room_key.as_str(), config.triggers_per_min_room),
        ];
        if let Err(key) = self.deps.limiter.try_acquire(&keys) {
            let whose = if key.starts_with("user:") {
                "your"
            } else {
                "this room's"
            };
            let reason = format!(
                "{whose} limit of AI requests per minute is reached; try again in a minute"
            );
            return self.reject(job, "rate_limited", reason, ctx);
        }
        let store = self.deps.store.clone();
        let room = self.room_id.clone();
        let user = job.charge_to.clone();
        let (per_user, per_room) = (config.tokens_per_day_user, config.tokens_per_day_room);
        let check = async move {
            let (_, since) = utc_day();
            let used_by_user = store
                .user_usage(&user, since)
                .await
                .map(|t| t.total())
                .unwrap_or(0);
            if used_by_user >= per_user {
                return Err(format!(
                    "your AI budget of {per_user} tokens per day is used up"
                ));
            }
            let used_in_room = store
                .room_usage(&room, since)
                .await
                .map(|t| t.total())
                .unwrap_or(0);
            if used_in_room >= per_room {
                return Err(format!(
                    "this room's AI budget of {per_room} tokens per day is used up"
                ));
            }
            Ok(())
        };
        ctx.spawn(
            check
                .into_actor(self)
                .map(move |verdict, agent, ctx| match verdict {
                    Ok(()) => {
                        agent.queue.push_back(job);
                        agent.publish_queue();
                        agent.try_start(ctx);
                    }
                    Err(reason) => agent.reject(job, "budget_exceeded", reason, ctx),
                }),
        );
    }

    fn reject(&mut self, job: Job, code: &str, reason: String, ctx: &mut Context<Self>) {
        let room = self.room.clone();
        let info = self.info.clone();
        let code = code.to_owned();
        ctx.spawn(
            async move {
                let message_id = MessageId::random();
                let start = Command::StartAnswer {
                    agent: info.name.clone(),
                    message_id: message_id.clone(),
                    trigger_message_id: job.trigger_message_id.clone(),
                    trigger_author: job.trigger_author.clone(),
                };
                if matches!(room.send(AgentWrite { command: start }).await, Ok(Ok(_))) {
                    let outcome = AnswerOutcome::Failed { code, reason };
                    finish(
                        &room,
                        &info,
                        &job,
                        &message_id,
                        String::new(),
                        outcome,
                        None,
                    )
                    .await;
                }
            }
            .into_actor(self),
        );
    }
}

impl Actor for Agent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let every = (self.deps.config.idle_timeout / 2).max(Duration::from_millis(50));
        ctx.run_interval(every, |agent, ctx| {
            let idle = agent.current.is_none() && agent.queue.is_empty();
            if idle && agent.last_activity.elapsed() >= agent.deps.config.idle_timeout {
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Self::Context) {
        self.room.do_send(AgentStopped {
            agent: self.info.name.clone(),
            addr: ctx.address(),
        });
    }
}

/// Answer this trigger (after the budgets allow it).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Enqueue {
    pub job: Job,
}

impl Handler<Enqueue> for Agent {
    type Result = ();

    fn handle(&mut self, msg: Enqueue, ctx: &mut Self::Context) {
        self.last_activity = Instant::now();
        self.admit(msg.job, ctx);
    }
}

/// Stop the answer `message_id` (or drop the queued trigger `message_id`). The Room checked
/// that `by` may.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct CancelJob {
    pub message_id: MessageId,
    pub by: UserId,
}

impl Handler<CancelJob> for Agent {
    type Result = ();

    fn handle(&mut self, msg: CancelJob, ctx: &mut Self::Context) {
        let matches_current = self.current.as_ref().is_some_and(|running| {
            running.message_id == msg.message_id || running.job.trigger_message_id == msg.message_id
        });
        if matches_current {
            let Some(mut running) = self.current.take() else {
                return;
            };
            if let Some(handle) = running.handle.take() {
                // Drops the provider stream: the upstream request is aborted now.
                ctx.cancel_future(handle);
            }
            if !running.progress.started.load(Ordering::SeqCst) {
                return self.try_start(ctx);
            }
            let room = self.room.clone();
            let info = self.info.clone();
            let text = running.progress.text();
            let usage = Some(running.progress.usage())
                .filter(|u| u.prompt_tokens + u.completion_tokens > 0);
            let outcome = AnswerOutcome::Cancelled { by: msg.by };
            let done = async move {
                finish(
                    &room,
                    &info,
                    &running.job,
                    &running.message_id,
                    text,
                    outcome,
                    usage,
                )
                .await
            };
            ctx.spawn(done.into_actor(self).map(|(), agent, ctx| {
                agent.report_usage(ctx);
                agent.try_start(ctx);
            }));
        } else if let Some(position) = self
            .queue
            .iter()
            .position(|job| job.trigger_message_id == msg.message_id)
        {
            self.queue.remove(position);
            self.publish_queue();
        }
    }
}

/// The current UTC day (`YYYY-MM-DD`) and when it started: budgets and usage reports count
/// tokens per UTC day.
pub fn utc_day() -> (String, Timestamp) {
    let now = Utc::now();
    let day = now.date_naive();
    let start = day
        .and_hms_opt(0, 0, 0)
        .map(|midnight| Utc.from_utc_datetime(&midnight).timestamp_millis())
        .unwrap_or(0);
    (day.format("%Y-%m-%d").to_string(), Timestamp(start))
}

/// One answer from start to finish (the actor cancels this future to stop it).
async fn answer(
    deps: AiDeps,
    room: Addr<Room>,
    room_id: RoomId,
    info: AgentInfo,
    job: Job,
    message_id: MessageId,
    progress: Arc<Progress>,
) {
    // Read the trigger now, not when it was queued: an edit made before the answer starts is
    // what gets answered, and a deleted trigger is not answered at all.
    let trigger = match deps.store.message(&room_id, &job.trigger_message_id).await {
        Ok(Some(trigger)) if !trigger.deleted => trigger,
        Ok(_) => return,
        Err(error) => {
            tracing::warn!(%error, "cannot read the trigger; not answering it");
            return;
        }
    };
    progress.started.store(true, Ordering::SeqCst);
    let start = Command::StartAnswer {
        agent: info.name.clone(),
        message_id: message_id.clone(),
        trigger_message_id: job.trigger_message_id.clone(),
        trigger_author: job.trigger_author.clone(),
    };
    if !matches!(room.send(AgentWrite { command: start }).await, Ok(Ok(_))) {
        progress.started.store(false, Ordering::SeqCst);
        return;
    }
    let result = match &deps.provider {
        None => {
            emit(&room, &progress, &message_id, NOT_CONFIGURED);
            Ok(())
        }
        Some(provider) => {
            stream_answer(
                &deps,
                provider.as_ref(),
                &room,
                &room_id,
                &info,
                &trigger,
                &message_id,
                &progress,
            )
            .await
        }
    };
    let outcome = match result {
        Ok(()) => AnswerOutcome::Completed,
        Err((code, reason)) => AnswerOutcome::Failed { code, reason },
    };
    let usage = Some(progress.usage()).filter(|u| u.prompt_tokens + u.completion_tokens > 0);
    finish(
        &room,
        &info,
        &job,
        &message_id,
        progress.text(),
        outcome,
        usage,
    )
    .await;
}

/// Sends a delta to the room (which fans it out everywhere).
fn emit(room: &Addr<Room>, progress: &Progress, message_id: &MessageId, delta: &str) {
    if delta.is_empty() {
        return;
    }
    let offset = progress.push(delta);
    room.do_send(AgentDelta {
        message_id: message_id.clone(),
        offset,
        text: delta.to_owned(),
    });
}

fn error_code(error: &LlmError) -> String {
    match error {
        LlmError::NotConfigured => "ai_not_configured",
        LlmError::Status { status: 429, .. } => "provider_rate_limited",
        LlmError::Status { .. } => "provider_error",
        LlmError::Transport(_) => "provider_unreachable",
        LlmError::Malformed(_) => "provider_malformed",
    }
    .to_owned()
}

#[allow(clippy::too_many_arguments)]
async fn stream_answer(
    deps: &AiDeps,
    provider: &dyn LlmProvider,
    room: &Addr<Room>,
    room_id: &RoomId,
    info: &AgentInfo,
    trigger: &Message,
    message_id: &MessageId,
    progress: &Progress,
) -> Result<(), (String, String)> {
    let config = &deps.config;
    let model = info
        .model
        .clone()
        .unwrap_or_else(|| provider.default_model().to_owned());
    let mut messages = context_for(deps, provider, room_id, info, trigger, &model).await;
    let mut last_checkpoint = Instant::now();
    for step in 0..=config.tool_steps {
        let tools = if step < config.tool_steps {
            tools::specs()
        } else {
            Vec::new()
        };
        let request = ChatRequest {
            model: model.clone(),
            messages: messages.clone(),
            tools,
            max_tokens: Some(config.answer_tokens),
        };

        let prompt_estimate: usize = request
            .messages
            .iter()
            .map(|m| context::estimate_tokens(&m.content))
            .sum();
        let mut stream = provider
            .stream(request)
            .await
            .map_err(|e| (error_code(&e), e.to_string()))?;
        let mut calls = Vec::new();
        let mut step_text = String::new();
        let mut reported = false;
        while let Some(item) = stream.next().await {
            match item.map_err(|e| (error_code(&e), e.to_string()))? {
                StreamItem::Delta(text) => {
                    step_text.push_str(&text);
                    emit(room, progress, message_id, &text);
                    if last_checkpoint.elapsed() >= config.checkpoint_every {
                        last_checkpoint = Instant::now();
                        checkpoint(deps, room, room_id, message_id, progress);
                    }
                }
                StreamItem::ToolCall(call) => calls.push(call),
                StreamItem::Usage {
                    prompt_tokens,
                    completion_tokens,
                } => {
                    reported = true;
                    if let Ok(mut usage) = progress.usage.lock() {
                        usage.prompt_tokens += prompt_tokens;
                        usage.completion_tokens += completion_tokens;
                    }
                }
                StreamItem::Done { .. } => break,
            }
        }
        if !reported {
            // Some servers (older llama.cpp, some proxies) report no usage: charge an estimate
            // so the token budgets still hold.
            if let Ok(mut usage) = progress.usage.lock() {
                usage.prompt_tokens += prompt_estimate as u64;
                usage.completion_tokens += context::estimate_tokens(&step_text) as u64;
            }
        }
        if calls.is_empty() {
            return Ok(());
        }
        messages.push(ChatMessage {
            role: "assistant".into(),
            content: step_text,
            tool_calls: calls.clone(),
            tool_call_id: None,
        });
        for call in calls {
            let result = tools::run(deps.store.as_ref(), room_id, &call).await;
            messages.push(ChatMessage {
                role: "tool".into(),
                content: result,
                tool_calls: Vec::new(),
                tool_call_id: Some(call.id.clone()),
            });
        }
    }
    Ok(())
}

/// Saves the text so far and re-sends it whole to the other nodes. The store write runs on its
/// own: the stream keeps being read meanwhile (a slow write must not delay the next delta).
fn checkpoint(
    deps: &AiDeps,
    room: &Addr<Room>,
    room_id: &RoomId,
    message_id: &MessageId,
    progress: &Progress,
) {
    let text = progress.text();
    let (store, room_id, id, saved) = (
        deps.store.clone(),
        room_id.clone(),
        message_id.clone(),
        text.clone(),
    );
    tokio::spawn(async move {
        if let Err(error) = store.save_partial(&room_id, &id, &saved).await {
            tracing::debug!(%error, "checkpoint failed; the next one will carry the text");
        }
    });
    room.do_send(AgentSnapshot {
        message_id: message_id.clone(),
        text,
    });
}

/// The request context, folding history that no longer fits into the room's rolling summary.
async fn context_for(
    deps: &AiDeps,
    provider: &dyn LlmProvider,
    room_id: &RoomId,
    info: &AgentInfo,
    trigger: &Message,
    model: &str,
) -> Vec<ChatMessage> {
    let config = &deps.config;
    let store = deps.store.as_ref();
    let mut summary = store.summary(room_id, &info.name).await.ok().flatten();
    let history = match store
        .messages(room_id, Some(trigger.seq), None, config.history_messages)
        .await
    {
        Ok(page) => page.messages,
        Err(_) => Vec::new(),
    };
    let mut thread = Vec::new();
    let mut next = trigger.reply_to_message.clone();
    while let Some(id) = next.take() {
        if thread.len() >= THREAD_DEPTH {
            break;
        }
        if let Ok(Some(parent)) = store.message(room_id, &id).await {
            next = parent.reply_to_message.clone();
            thread.push(parent);
        }
    }
    thread.reverse();
    let answer_tokens = config.answer_tokens as usize;
    let visible = |summary: &Option<(String, i64)>| -> Vec<Message> {
        let after = summary.as_ref().map_or(0, |(_, seq)| *seq);
        history
            .iter()
            .filter(|m| m.seq > after && !m.deleted)
            .cloned()
            .collect()
    };
    let mut recent = visible(&summary);
    let mut built = context::build(&context::ContextInput {
        agent: info,
        trigger,
        history: &recent,
        thread: &thread,
        summary: summary.as_ref().map(|(text, _)| text.as_str()),
        budget_tokens: config.context_tokens,
        answer_tokens,
    });
    if !built.overflow.is_empty() {
        // Fold what no longer fits into the summary, a chunk per request so nothing old is
        // dropped unread; each step is persisted, so an interrupted fold resumes from there.
        let mut remaining: &[Message] = &built.overflow;
        let mut folded = false;
        while !remaining.is_empty() {
            let previous = summary.as_ref().map(|(text, _)| text.as_str());
            let take = context::summary_chunk(previous, remaining, config.context_tokens);
            let request = ChatRequest {
                model: model.to_owned(),
                messages: context::summary_request(
                    previous,
                    &remaining[..take],
                    config.context_tokens,
                    context::SUMMARY_TOKENS,
                ),
                tools: Vec::new(),
                max_tokens: Some(context::SUMMARY_TOKENS as u32),
            };
            let Some(text) = collect_text(provider, request).await else {
                break;
            };
            let through = remaining[take - 1].seq;
            if let Err(error) = store
                .save_summary(room_id, &info.name, &text, through)
                .await
            {
                tracing::warn!(%error, "cannot save the room summary");
            }
            summary = Some((text, through));
            remaining = &remaining[take..];
            folded = true;
        }
        if folded {
            recent = visible(&summary);
            built = context::build(&context::ContextInput {
                agent: info,
                trigger,
                history: &recent,
                thread: &thread,
                summary: summary.as_ref().map(|(text, _)| text.as_str()),
                budget_tokens: config.context_tokens,
                answer_tokens,
            });
        }
    }
    built.messages
}

/// A whole (non-streamed to anyone) completion, for summaries.
async fn collect_text(provider: &dyn LlmProvider, request: ChatRequest) -> Option<String> {
    let mut stream = provider.stream(request).await.ok()?;
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item.ok()? {
            StreamItem::Delta(delta) => text.push_str(&delta),
            StreamItem::Done { .. } => break,
            _ => {}
        }
    }
    Some(text).filter(|t| !t.trim().is_empty())
}

pub(crate) async fn finish(
    room: &Addr<Room>,
    info: &AgentInfo,
    job: &Job,
    message_id: &MessageId,
    text: String,
    outcome: AnswerOutcome,
    usage: Option<Usage>,
) {
    let command = Command::FinishAnswer {
        author: Author {
            id: info.author_id(),
            name: info.name.clone(),
            kind: AuthorKind::Ai,
        },
        message_id: message_id.clone(),
        trigger_message_id: job.trigger_message_id.clone(),
        charge_to: job.charge_to.clone(),
        text,
        outcome,
        usage,
    };
    match room.send(AgentWrite { command }).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot finish an answer"),
        Err(_) => tracing::warn!("the room stopped before an answer was finished"),
    }
}
