//! A private redis-server on its own port, for tests that stop and restart Redis (the shared one
//! on 6379 serves other tests running in parallel).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisProcess {
    pub port: u16,
    child: Option<Child>,
}

impl RedisProcess {
    pub async fn start() -> RedisProcess {
        let port = super::process::free_port();
        let mut redis = RedisProcess { port, child: None };
        redis.restart().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (Debian package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: every connection drops at once, nothing in flight is delivered.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers at `host:port` (the shared one, for the bus conformance suite).
pub fn reachable(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1))
        .is_ok()
}

/// The shared Redis on 6379, or `None` (the test is skipped, and says so) when it is not there
/// outside CI. In CI a missing Redis is a failure.
pub fn shared() -> Option<&'static str> {
    if reachable(6379) {
        return Some("redis://127.0.0.1:6379/");
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "Redis is required in CI on 127.0.0.1:6379"
    );
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    eprintln!("SKIPPED (no Redis on 127.0.0.1:6379): {test}");
    None
}
