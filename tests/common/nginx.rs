//! nginx as the load balancer in cluster tests: deploy/nginx-local.conf.template rendered into a
//! temp dir and run as an ordinary process on loopback.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Nginx {
    pub async fn start(upstream_ports: &[u16]) -> Nginx {
        let port = super::process::free_port();
        let dir = std::env::temp_dir().join(super::unique("cochat_nginx_"));
        std::fs::create_dir_all(&dir).expect("temp dir is writable");
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/nginx-local.conf.template"
        ))
        .expect("the nginx template is in the repo");
        let upstreams: String = upstream_ports
            .iter()
            .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let config = template
            .replace("@RUN_DIR@", &dir.display().to_string())
            .replace("@LISTEN@", &format!("127.0.0.1:{port}"))
            .replace("@UPSTREAMS@\n", &upstreams);
        let config_path = dir.join("nginx.conf");
        std::fs::write(&config_path, config).expect("config is writable");
        let child = Command::new("nginx")
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx is installed (scripts/validate-deploy.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start on {port}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Nginx { port, dir, child }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/api/v1/ws", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
