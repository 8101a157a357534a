//! What an agent sends the model: its system prompt, the room's rolling summary, the thread the
//! trigger replies to, as much recent history as fits (oldest first, each line with its
//! speaker), and the trigger itself, all within the model's token budget. History that does
//! not fit is returned so the caller can fold it into the summary.

use crate::event::{AgentInfo, AuthorKind, Message};
use crate::llm::ChatMessage;

/// Tokens of overhead per message (role, separators) in the estimate.
const PER_MESSAGE: usize = 4;

/// A deliberately pessimistic estimate: about four characters per token, rounded up.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4) + PER_MESSAGE
}

pub fn default_system_prompt(agent: &AgentInfo) -> String {
    format!(
        "You are {name}, an AI assistant taking part in a group chat room. Room messages are \
         shown as `Name: text`. Answer the latest message, which called on you, helpfully and \
         concisely, in the language it is written in. You can search the room's history with \
         the tools when the recent messages are not enough.",
        name = agent.name
    )
}

pub struct ContextInput<'a> {
    pub agent: &'a AgentInfo,
    pub trigger: &'a Message,
    /// Messages before the trigger (after what the summary covers), oldest first.
    pub history: &'a [Message],
    /// The messages the trigger replies to, oldest first.
    pub thread: &'a [Message],
    pub summary: Option<&'a str>,
    /// The model's context budget, and what is kept free for the answer.
    pub budget_tokens: usize,
    pub answer_tokens: usize,
}

pub struct Context {
    pub messages: Vec<ChatMessage>,
    /// History that did not fit, oldest first (fold it into the summary).
    pub overflow: Vec<Message>,
    pub estimated_tokens: usize,
}

/// How a message reads to the model: its own answers as `assistant`, everyone else as `user`
/// with the speaker's name.
pub fn as_chat(agent: &AgentInfo, message: &Message) -> ChatMessage {
    if message.author.kind == AuthorKind::Ai && message.author.id == agent.author_id() {
        ChatMessage::new("assistant", message.text.clone())
    } else {
        ChatMessage::new("user", speaker_line(message))
    }
}

pub fn speaker_line(message: &Message) -> String {
    let suffix = if message.author.kind == AuthorKind::Ai {
        " (AI)"
    } else {
        ""
    };
    format!("{}{}: {}", message.author.name, suffix, message.text)
}

pub fn build(input: &ContextInput<'_>) -> Context {
    let system = input
        .agent
        .system_prompt
        .clone()
        .filter(|prompt| !prompt.trim().is_empty())
        .unwrap_or_else(|| default_system_prompt(input.agent));
    let mut head = vec![ChatMessage::new("system", system)];
    if let Some(summary) = input.summary.filter(|s| !s.is_empty()) {
        head.push(ChatMessage::new(
            "system",
            format!("Summary of the earlier conversation in this room:\n{summary}"),
        ));
    }
    if !input.thread.is_empty() {
        let lines: Vec<String> = input.thread.iter().map(speaker_line).collect();
        head.push(ChatMessage::new(
            "system",
            format!(
                "The latest message replies to this thread (oldest first):\n{}",
                lines.join("\n")
            ),
        ));
    }
    let mut trigger = as_chat(input.agent, input.trigger);
    let fixed: usize = head
        .iter()
        .map(|m| estimate_tokens(&m.content))
        .sum::<usize>()
        + input.answer_tokens;
    let room_for_trigger = input.budget_tokens.saturating_sub(fixed);
    if estimate_tokens(&trigger.content) > room_for_trigger {
        // Even alone the trigger is too long: keep its beginning.
        let keep = room_for_trigger.saturating_sub(PER_MESSAGE) * 4;
        trigger.content = trigger.content.chars().take(keep).collect();
    }
    let mut available = room_for_trigger.saturating_sub(estimate_tokens(&trigger.content));
    let mut kept = Vec::new();
    let mut cut = input.history.len();
    for (index, message) in input.history.iter().enumerate().rev() {
        let chat = as_chat(input.agent, message);
        let cost = estimate_tokens(&chat.content);
        if cost > available {
            break;
        }
        available -= cost;
        kept.push(chat);
        cut = index;
    }
    kept.reverse();
    let overflow = input.history[..cut].to_vec();
    let mut messages = head;
    messages.extend(kept);
    messages.push(trigger);
    let estimated_tokens = messages.iter().map(|m| estimate_tokens(&m.content)).sum();
    Context {
        messages,
        overflow,
        estimated_tokens,
    }
}

/// Tokens kept for a summary's own answer.
pub const SUMMARY_TOKENS: usize = 400;

const SUMMARY_INSTRUCTIONS: &str = "Summarise this chat history so it can stand in for it later: \
    who said what that matters, decisions, open questions, facts worth remembering. Plain prose, \
    at most 200 words.";

/// How many of `overflow`'s first messages fit in one summary request next to `previous`
/// (at least one: an oversized message is cut by `summary_request`).
pub fn summary_chunk(previous: Option<&str>, overflow: &[Message], budget_tokens: usize) -> usize {
    let mut room = budget_tokens
        .saturating_sub(estimate_tokens(SUMMARY_INSTRUCTIONS) + SUMMARY_TOKENS + PER_MESSAGE)
        .saturating_sub(previous.map_or(0, estimate_tokens));
    let mut taken = 0;
    for message in overflow {
        let cost = estimate_tokens(&speaker_line(message));
        if cost > room {
            break;
        }
        room -= cost;
        taken += 1;
    }
    taken.max(1).min(overflow.len())
}

/// The request that folds `overflow` (and the previous summary) into a new summary, cut to fit.
pub fn summary_request(
    previous: Option<&str>,
    overflow: &[Message],
    budget_tokens: usize,
    answer_tokens: usize,
) -> Vec<ChatMessage> {
    let instructions = SUMMARY_INSTRUCTIONS;
    let mut text = String::new();
    if let Some(previous) = previous.filter(|p| !p.is_empty()) {
        text.push_str("Earlier summary:\n");
        text.push_str(previous);
        text.push_str("\n\nThen:\n");
    }
    for message in overflow {
        text.push_str(&speaker_line(message));
        text.push('\n');
    }
    let room = budget_tokens
        .saturating_sub(estimate_tokens(instructions) + answer_tokens + PER_MESSAGE)
        .saturating_mul(4);
    let chars = text.chars().count();
    if chars > room {
        // Keep the most recent part: the previous summary already carries the oldest.
        text = text.chars().skip(chars - room).collect();
    }
    vec![
        ChatMessage::new("system", instructions),
        ChatMessage::new("user", text),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Author;
    use crate::ids::{MessageId, RoomId, UserId};
    use crate::time::Timestamp;

    fn message(seq: i64, name: &str, kind: AuthorKind, text: &str) -> Message {
        let id = if kind == AuthorKind::Ai {
            format!("ai:{name}")
        } else {
            name.to_lowercase()
        };
        Message {
            id: MessageId(format!("m{seq}")),
            room: RoomId::from("r"),
            seq,
            author: Author {
                id: UserId(id),
                name: name.into(),
                kind,
            },
            text: text.into(),
            reply_to_message: None,
            created_at: Timestamp(0),
            edited_at: None,
            deleted: false,
            reactions: vec![],
        }
    }

    #[test]
    fn history_is_in_order_with_speakers_and_the_agents_own_lines_as_assistant() {
        let agent = AgentInfo::default_agent();
        let history = vec![
            message(1, "Ada", AuthorKind::User, "hello"),
            message(2, "ai", AuthorKind::Ai, "hi Ada"),
            message(3, "poet", AuthorKind::Ai, "a rhyme"),
        ];
        let trigger = message(4, "Bob", AuthorKind::User, "@ai what did Ada say?");
        let context = build(&ContextInput {
            agent: &agent,
            trigger: &trigger,
            history: &history,
            thread: &[],
            summary: Some("they met"),
            budget_tokens: 4000,
            answer_tokens: 500,
        });
        let lines: Vec<(&str, &str)> = context
            .messages
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        assert_eq!(
            lines[1],
            (
                "system",
                "Summary of the earlier conversation in this room:\nthey met"
            )
        );
        assert_eq!(
            &lines[2..],
            &[
                ("user", "Ada: hello"),
                ("assistant", "hi Ada"),
                ("user", "poet (AI): a rhyme"),
                ("user", "Bob: @ai what did Ada say?"),
            ]
        );
        assert!(context.overflow.is_empty());
    }

    #[test]
    fn what_does_not_fit_overflows_oldest_first_and_the_request_stays_within_budget() {
        let agent = AgentInfo::default_agent();
        let history: Vec<Message> = (1..=100)
            .map(|i| message(i, "Ada", AuthorKind::User, &"x".repeat(200)))
            .collect();
        let trigger = message(101, "Bob", AuthorKind::User, "/ai sum it up");
        let context = build(&ContextInput {
            agent: &agent,
            trigger: &trigger,
            history: &history,
            thread: &[],
            summary: None,
            budget_tokens: 2000,
            answer_tokens: 500,
        });
        assert!(
            context.estimated_tokens + 500 <= 2000,
            "{}",
            context.estimated_tokens
        );
        assert!(!context.overflow.is_empty());
        let kept = context.messages.len() - 2;
        assert_eq!(context.overflow.len() + kept, 100);
        assert_eq!(
            context.overflow.last().map(|m| m.seq),
            Some(100 - kept as i64),
            "the newest history is kept"
        );
    }

    #[test]
    fn an_overlong_trigger_is_cut_to_fit() {
        let agent = AgentInfo::default_agent();
        let trigger = message(1, "Bob", AuthorKind::User, &"y".repeat(100_000));
        let context = build(&ContextInput {
            agent: &agent,
            trigger: &trigger,
            history: &[],
            thread: &[],
            summary: None,
            budget_tokens: 1000,
            answer_tokens: 200,
        });
        assert!(context.estimated_tokens + 200 <= 1000);
    }
}
