//! Which agents a message calls on, decided on the server from the text: `/ai ...` calls the
//! default agent, `@name` calls the agent of that name (word-bounded, case-insensitive), and a
//! reply to an agent's message calls that agent (the caller resolves the reply's author).
//! Clients cannot set a flag to trigger anything.

use crate::event::AgentInfo;

/// Agent names the text calls on, in order of first mention, without duplicates.
pub fn mentioned_agents(text: &str, agents: &[String]) -> Vec<String> {
    let mut called = Vec::new();
    let trimmed = text.trim_start();
    if let Some(rest) = trimmed.strip_prefix("/ai") {
        if rest.is_empty() || rest.starts_with(char::is_whitespace) {
            called.push(AgentInfo::DEFAULT_NAME.to_owned());
        }
    }
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !is_name_char(chars[i - 1]);
        if chars[i] == '@' && boundary {
            let start = i + 1;
            let mut end = start;
            while end < chars.len() && is_name_char(chars[end]) {
                end += 1;
            }
            let name: String = chars[start..end].iter().collect::<String>().to_lowercase();
            if !name.is_empty() && agents.contains(&name) && !called.contains(&name) {
                called.push(name);
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    called
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Whether `name` is a valid agent name: 1-32 of `a-z 0-9 _ -`.
pub fn valid_agent_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agents() -> Vec<String> {
        vec!["ai".into(), "poet".into(), "sage-2".into()]
    }

    #[test]
    fn slash_ai_calls_the_default_agent() {
        assert_eq!(mentioned_agents("/ai what time is it", &agents()), ["ai"]);
        assert_eq!(mentioned_agents("  /ai", &agents()), ["ai"]);
        assert!(mentioned_agents("/aim high", &agents()).is_empty());
        assert!(mentioned_agents("see /ai later", &agents()).is_empty());
    }

    #[test]
    fn mentions_are_word_bounded_case_insensitive_and_deduplicated() {
        assert_eq!(
            mentioned_agents("hey @Poet and @sage-2, also @poet", &agents()),
            ["poet", "sage-2"]
        );
        assert!(mentioned_agents("mail me at bob@poet.org", &agents()).is_empty());
        assert!(mentioned_agents("@poetry is not @poet-ish", &agents()).is_empty());
        assert!(mentioned_agents("@nobody here", &agents()).is_empty());
        assert_eq!(mentioned_agents("(@ai)", &agents()), ["ai"]);
    }

    #[test]
    fn agent_names_are_checked() {
        assert!(valid_agent_name("sage-2"));
        assert!(!valid_agent_name("Sage"));
        assert!(!valid_agent_name(""));
        assert!(!valid_agent_name(&"x".repeat(33)));
    }
}
