//! The real `cochat` binary as a child process, for tests that kill it (-9) or send SIGTERM.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct CochatProcess {
    pub port: u16,
    pub base: String,
    child: Child,
}

/// A port that was free a moment ago (the child binds it right after).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding port 0 works");
    listener.local_addr().expect("bound").port()
}

impl CochatProcess {
    /// Starts the binary on a fresh port and waits until `/readyz` answers 200.
    pub async fn start(
        database_url: &str,
        data_dir: &PathBuf,
        extra_env: &[(&str, &str)],
    ) -> CochatProcess {
        Self::start_on(free_port(), database_url, data_dir, extra_env).await
    }

    /// Like `start`, on a given port (a restarted node keeps its address behind the balancer).
    pub async fn start_on(
        port: u16,
        database_url: &str,
        data_dir: &PathBuf,
        extra_env: &[(&str, &str)],
    ) -> CochatProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cochat"));
        command
            .env("COCHAT_BIND", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", database_url)
            .env("COCHAT_DATA_DIR", data_dir)
            .env("JWT_SECRET", "process-test-secret-process-test-secret")
            .env("COCHAT_RATE_PER_S", "10000")
            .env("COCHAT_RATE_BURST", "10000")
            .env("COCHAT_WORKERS", "1")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (name, value) in extra_env {
            command.env(name, value);
        }
        let child = command.spawn().expect("the cochat binary starts");
        let process = CochatProcess {
            port,
            base: format!("http://127.0.0.1:{port}"),
            child,
        };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&self) {
        super::server::wait_ready(&self.base).await;
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/api/v1/ws", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no drain, no flush, nothing after this instruction runs in the server.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an orchestrator sends it.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be polled") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "cochat did not exit within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for CochatProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
