//! The `cochat` binary: settings -> logging -> run (migrations run as the store opens).

use anyhow::Context as _;
use cochat::settings::Settings;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().map_err(anyhow::Error::msg)?;
    cochat::logging::init(settings.json_logs);
    let listener = std::net::TcpListener::bind(&settings.bind)
        .with_context(|| format!("binding {}", settings.bind))?;
    cochat::run(settings, listener).await
}
