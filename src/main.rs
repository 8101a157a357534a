//! The `cochat` binary: settings -> logging -> run (migrations run as the store opens).

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use anyhow::Context as _;
use cochat::settings::Settings;

/// Connections the kernel queues before we accept them. When a node dies its clients reconnect to
/// the others all at once; with std's default of 128, a storm of thousands overflows the queue, and
/// a client whose handshake ACK was dropped can stall long enough for its first request to time out.
/// (The kernel caps this at `net.core.somaxconn`.)
const LISTEN_BACKLOG: i32 = 4096;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::from_env().map_err(anyhow::Error::msg)?;
    cochat::logging::init(settings.json_logs);
    let listener = listen(&settings.bind).with_context(|| format!("binding {}", settings.bind))?;
    cochat::run(settings, listener).await
}

fn listen(bind: &str) -> anyhow::Result<TcpListener> {
    let address: SocketAddr = bind
        .to_socket_addrs()?
        .next()
        .context("the address resolves to nothing")?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // A restarted node can bind while the old one's connections are in TIME_WAIT (as std does).
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
