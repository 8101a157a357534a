//! The real cochat server for tests: `cochat::run_until` on its own thread with its own actix
//! System, on a port the OS picks, with its own data dir. Dropping it drains and stops it.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cochat::settings::Settings;
use tokio::sync::oneshot;

use super::db::TestDatabase;

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Settings a test server starts from: generous rate limits (tests send bursts on purpose),
/// a short drain window, one worker thread.
pub fn test_settings(database_url: &str) -> Settings {
    let mut settings = Settings::defaults();
    settings.database_url = Some(database_url.to_owned());
    settings.data_dir = std::env::temp_dir().join(super::unique("cochat_data_"));
    settings.jwt_secret = Some(super::unique("test-secret-").repeat(3));
    settings.node_id = super::unique("test-node-");
    settings.limits.rate_per_s = 10_000.0;
    settings.limits.rate_burst = 10_000.0;
    settings.drain_window = Duration::from_millis(300);
    settings.room_idle = Duration::from_secs(2);
    settings.workers = 1;
    settings
}

impl TestServer {
    pub async fn start(db: &TestDatabase) -> TestServer {
        Self::start_with(test_settings(&db.url)).await
    }

    pub async fn start_with(settings: Settings) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding port 0 on loopback works");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (stop, stopped) = oneshot::channel::<()>();
        let run_settings = settings.clone();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            let result = system.block_on(cochat::run_until(run_settings, listener, async move {
                let _ = stopped.await;
            }));
            if let Err(error) = result {
                eprintln!("test server failed: {error:#}");
            }
        });
        let server = TestServer {
            addr,
            base: format!("http://{addr}"),
            settings,
            stop: Some(stop),
            thread: Some(thread),
        };
        server.wait_ready().await;
        server
    }

    async fn wait_ready(&self) {
        wait_ready(&self.base).await;
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/api/v1/ws", self.addr)
    }

    /// Starts draining (as SIGTERM would) without waiting for the server to stop.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_dir_all(&self.settings.data_dir);
    }
}

/// Polls `<base>/readyz` until it answers 200 (30 s at most).
pub async fn wait_ready(base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(format!("{base}/readyz")).send().await {
            if response.status().is_success() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the server at {base} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The data dir of a server, for tests that restart on the same files.
pub fn data_dir(server: &TestServer) -> PathBuf {
    server.settings.data_dir.clone()
}
