//! Provider presets: `AI_PROVIDER=deepseek` (or openai, gemini, ollama, vllm, llamacpp,
//! openai-compatible) fills in the base URL and model, and `AI_BASE_URL`, `AI_API_KEY`, `AI_MODEL`
//! override them. Nothing set means no AI: agents then answer with a "not configured" notice.
//!
//! | variable | meaning |
//! |---|---|
//! | `AI_PROVIDER` | a preset name; unset with `AI_BASE_URL` set means `openai-compatible` |
//! | `AI_BASE_URL` | up to the version, e.g. `https://api.deepseek.com/v1` |
//! | `AI_API_KEY` | the key (`DEEPSEEK_API_KEY`, `OPENAI_API_KEY`, `GEMINI_API_KEY` are read as fallbacks) |
//! | `AI_MODEL` | the default model of agents |
//! | `AI_TIMEOUT_S` | longest wait for the first byte of an answer (default 60) |
//! | `AI_IDLE_TIMEOUT_S` | longest silence mid-answer (default 60) |

use std::sync::Arc;
use std::time::Duration;

use cochat_actors::llm::LlmProvider;

use super::provider::OpenAiCompatible;
pub use super::provider::{ProviderConfig, RetryPolicy};

/// One known endpoint: where it is, its usual model, whether it takes a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub name: &'static str,
    pub base_url: Option<&'static str>,
    /// `None`: the server serves whatever it loaded, so `AI_MODEL` has to name it.
    pub model: Option<&'static str>,
    pub needs_key: bool,
    /// The provider's own variable for the key, read when `AI_API_KEY` is unset.
    pub key_variable: Option<&'static str>,
}

pub const PRESETS: &[Preset] = &[
    Preset {
        name: "deepseek",
        base_url: Some("https://api.deepseek.com/v1"),
        model: Some("deepseek-chat"),
        needs_key: true,
        key_variable: Some("DEEPSEEK_API_KEY"),
    },
    Preset {
        name: "openai",
        base_url: Some("https://api.openai.com/v1"),
        model: Some("gpt-4o-mini"),
        needs_key: true,
        key_variable: Some("OPENAI_API_KEY"),
    },
    Preset {
        name: "gemini",
        base_url: Some("https://generativelanguage.googleapis.com/v1beta/openai"),
        model: Some("gemini-2.0-flash"),
        needs_key: true,
        key_variable: Some("GEMINI_API_KEY"),
    },
    Preset {
        name: "ollama",
        base_url: Some("http://127.0.0.1:11434/v1"),
        model: Some("llama3.2"),
        needs_key: false,
        key_variable: None,
    },
    Preset {
        name: "vllm",
        base_url: Some("http://127.0.0.1:8000/v1"),
        // vLLM rejects a model name it does not serve.
        model: None,
        needs_key: false,
        key_variable: None,
    },
    Preset {
        name: "llamacpp",
        base_url: Some("http://127.0.0.1:8080/v1"),
        // llama.cpp's server answers with its one loaded model whatever the name.
        model: Some("default"),
        needs_key: false,
        key_variable: None,
    },
    Preset {
        name: "openai-compatible",
        base_url: None,
        model: None,
        needs_key: false,
        key_variable: None,
    },
];

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|preset| preset.name == name)
}

/// The provider configuration from `lookup(name)` (the environment in production): `Ok(None)`
/// when neither `AI_PROVIDER` nor `AI_BASE_URL` is set; an error naming the variable otherwise.
pub fn provider_config(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Option<ProviderConfig>, String> {
    let get = |name: &str| {
        lookup(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    };
    let base_url = get("AI_BASE_URL");
    let name = match get("AI_PROVIDER") {
        Some(name) => name.to_ascii_lowercase(),
        None if base_url.is_some() => "openai-compatible".to_owned(),
        None => return Ok(None),
    };
    // Spelling variants people are likely to write.
    let name = match name.as_str() {
        "llama.cpp" | "llama-cpp" | "llama_cpp" => "llamacpp".to_owned(),
        "openai_compatible" | "compatible" | "custom" => "openai-compatible".to_owned(),
        _ => name,
    };
    let preset = preset(&name).ok_or_else(|| {
        let known: Vec<&str> = PRESETS.iter().map(|preset| preset.name).collect();
        format!(
            "AI_PROVIDER: unknown provider {name:?}; expected one of {}",
            known.join(", ")
        )
    })?;

    let base_url = base_url
        .or_else(|| preset.base_url.map(str::to_owned))
        .ok_or_else(|| format!("AI_BASE_URL is required with AI_PROVIDER={}", preset.name))?;
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(format!(
            "AI_BASE_URL: expected an http:// or https:// URL, got {base_url:?}"
        ));
    }
    let model = get("AI_MODEL")
        .or_else(|| preset.model.map(str::to_owned))
        .ok_or_else(|| format!("AI_MODEL is required with AI_PROVIDER={}", preset.name))?;
    let api_key = get("AI_API_KEY").or_else(|| preset.key_variable.and_then(get));
    if preset.needs_key && api_key.is_none() {
        let also = preset
            .key_variable
            .map(|variable| format!(" (or {variable})"))
            .unwrap_or_default();
        return Err(format!(
            "AI_API_KEY{also} is required with AI_PROVIDER={}",
            preset.name
        ));
    }

    let mut config = ProviderConfig::new(base_url, model);
    config.provider = preset.name.to_owned();
    config.api_key = api_key;
    if let Some(timeout) = seconds(&get, "AI_TIMEOUT_S")? {
        config.first_byte_timeout = timeout;
    }
    if let Some(timeout) = seconds(&get, "AI_IDLE_TIMEOUT_S")? {
        config.idle_timeout = timeout;
    }
    Ok(Some(config))
}

/// A positive number of seconds (zero would time out every request).
fn seconds(get: &impl Fn(&str) -> Option<String>, name: &str) -> Result<Option<Duration>, String> {
    let Some(value) = get(name) else {
        return Ok(None);
    };
    value
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n > 0.0 && *n < 1e9)
        .map(|n| Some(Duration::from_secs_f64(n)))
        .ok_or_else(|| format!("{name}: expected a positive number of seconds, got {value:?}"))
}

/// The client for a configuration. Fails only if the HTTP client cannot be built (TLS set-up).
pub fn build(config: ProviderConfig) -> Result<Arc<dyn LlmProvider>, String> {
    Ok(Arc::new(OpenAiCompatible::new(config)?))
}

/// `provider_config` from the process environment, then `build`.
pub fn from_env() -> Result<Option<Arc<dyn LlmProvider>>, String> {
    provider_config(|name| std::env::var(name).ok())?
        .map(build)
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Option<ProviderConfig>, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        provider_config(move |name| {
            vars.iter()
                .find(|(variable, _)| variable == name)
                .map(|(_, value)| value.clone())
        })
    }

    fn ok(vars: &[(&str, &str)]) -> ProviderConfig {
        config(vars)
            .unwrap_or_else(|error| panic!("{vars:?} should be valid: {error}"))
            .unwrap_or_else(|| panic!("{vars:?} should configure a provider"))
    }

    fn err(vars: &[(&str, &str)]) -> String {
        config(vars).expect_err("this configuration is invalid")
    }

    #[test]
    fn nothing_set_means_no_provider() {
        assert_eq!(config(&[]), Ok(None));
        assert_eq!(
            config(&[("AI_PROVIDER", "  "), ("AI_API_KEY", "k")]),
            Ok(None)
        );
    }

    #[test]
    fn hosted_presets_fill_in_url_and_model_and_need_a_key() {
        for (name, url, model, key_variable) in [
            (
                "deepseek",
                "https://api.deepseek.com/v1",
                "deepseek-chat",
                "DEEPSEEK_API_KEY",
            ),
            (
                "openai",
                "https://api.openai.com/v1",
                "gpt-4o-mini",
                "OPENAI_API_KEY",
            ),
            (
                "gemini",
                "https://generativelanguage.googleapis.com/v1beta/openai",
                "gemini-2.0-flash",
                "GEMINI_API_KEY",
            ),
        ] {
            let config = ok(&[("AI_PROVIDER", name), ("AI_API_KEY", "sk-1")]);
            assert_eq!(config.provider, name);
            assert_eq!(config.base_url, url);
            assert_eq!(config.model, model);
            assert_eq!(config.api_key.as_deref(), Some("sk-1"));

            let error = err(&[("AI_PROVIDER", name)]);
            assert!(
                error.contains("AI_API_KEY") && error.contains(name),
                "{error}"
            );

            let config = ok(&[("AI_PROVIDER", name), (key_variable, "sk-2")]);
            assert_eq!(
                config.api_key.as_deref(),
                Some("sk-2"),
                "{key_variable} is a fallback"
            );
        }
    }

    #[test]
    fn local_presets_need_no_key() {
        let ollama = ok(&[("AI_PROVIDER", "ollama")]);
        assert_eq!(ollama.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(ollama.model, "llama3.2");
        assert_eq!(ollama.api_key, None);

        let llamacpp = ok(&[("AI_PROVIDER", "llama.cpp")]);
        assert_eq!(llamacpp.provider, "llamacpp");
        assert_eq!(llamacpp.base_url, "http://127.0.0.1:8080/v1");

        let error = err(&[("AI_PROVIDER", "vllm")]);
        assert!(
            error.contains("AI_MODEL"),
            "vLLM only serves the model it loaded: {error}"
        );
        let vllm = ok(&[
            ("AI_PROVIDER", "vllm"),
            ("AI_MODEL", "Qwen/Qwen2.5-7B-Instruct"),
        ]);
        assert_eq!(vllm.base_url, "http://127.0.0.1:8000/v1");
        assert_eq!(vllm.model, "Qwen/Qwen2.5-7B-Instruct");
    }

    #[test]
    fn explicit_variables_override_the_preset() {
        let config = ok(&[
            ("AI_PROVIDER", "OpenAI"),
            ("AI_BASE_URL", "https://proxy.example/v1/"),
            ("AI_API_KEY", "k"),
            ("AI_MODEL", "gpt-4.1"),
            ("AI_TIMEOUT_S", "5"),
            ("AI_IDLE_TIMEOUT_S", "0.5"),
        ]);
        assert_eq!(
            config.base_url, "https://proxy.example/v1",
            "trailing slash dropped"
        );
        assert_eq!(config.model, "gpt-4.1");
        assert_eq!(config.first_byte_timeout, Duration::from_secs(5));
        assert_eq!(config.idle_timeout, Duration::from_millis(500));
        assert_eq!(config.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn a_base_url_alone_means_openai_compatible() {
        let config = ok(&[
            ("AI_BASE_URL", "http://10.0.0.5:9000/v1"),
            ("AI_MODEL", "m"),
        ]);
        assert_eq!(config.provider, "openai-compatible");
        assert_eq!(config.base_url, "http://10.0.0.5:9000/v1");
        assert_eq!(config.api_key, None);
        assert_eq!(config.first_byte_timeout, Duration::from_secs(60));
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_configurations_name_the_variable() {
        let error = err(&[("AI_PROVIDER", "skynet")]);
        assert!(
            error.contains("AI_PROVIDER") && error.contains("deepseek"),
            "{error}"
        );

        let error = err(&[("AI_PROVIDER", "openai-compatible"), ("AI_MODEL", "m")]);
        assert!(error.contains("AI_BASE_URL"), "{error}");

        let error = err(&[("AI_BASE_URL", "api.example.com/v1"), ("AI_MODEL", "m")]);
        assert!(error.contains("AI_BASE_URL"), "{error}");

        let error = err(&[("AI_BASE_URL", "http://h/v1")]);
        assert!(error.contains("AI_MODEL"), "{error}");

        for value in ["soon", "0", "-1"] {
            let error = err(&[("AI_PROVIDER", "ollama"), ("AI_TIMEOUT_S", value)]);
            assert!(error.contains("AI_TIMEOUT_S"), "{error}");
        }
        let error = err(&[("AI_PROVIDER", "ollama"), ("AI_IDLE_TIMEOUT_S", "x")]);
        assert!(error.contains("AI_IDLE_TIMEOUT_S"), "{error}");
    }

    #[test]
    fn a_built_provider_reports_its_default_model() {
        let provider = build(ok(&[("AI_PROVIDER", "ollama")])).expect("the client builds");
        assert_eq!(provider.default_model(), "llama3.2");
    }
}
