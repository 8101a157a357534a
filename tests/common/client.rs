//! Protocol clients for tests: `Api` over HTTP (reqwest) and `Ws` over a real WebSocket
//! (tokio-tungstenite). `Ws` keeps frames it skipped while waiting for a particular one, so no
//! frame is lost to a test that waits for an answer first and reads events after.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

#[derive(Clone, Debug)]
pub struct User {
    pub id: String,
    pub name: String,
    pub token: String,
}

impl Api {
    pub fn new(base: &str) -> Self {
        Self {
            base: base.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Sends a request and returns the status and the JSON body (`Null` when empty).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a valid HTTP method");
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the server answers HTTP");
        let status = response.status();
        let text = response.text().await.expect("the body is readable");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, body)
    }

    pub async fn register(&self, prefix: &str) -> User {
        let username = super::unique(prefix);
        let (status, body) = self
            .call(
                "POST",
                "/api/v1/auth/register",
                None,
                Some(json!({"username": username, "password": "correct horse battery"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "register: {body}");
        User {
            id: body["user"]["id"].as_str().expect("user id").to_owned(),
            name: body["user"]["display_name"]
                .as_str()
                .expect("display name")
                .to_owned(),
            token: body["token"].as_str().expect("token").to_owned(),
        }
    }

    pub async fn create_room(&self, owner: &User, name: &str) -> String {
        let (status, body) = self
            .call(
                "POST",
                "/api/v1/rooms",
                Some(&owner.token),
                Some(json!({"name": name})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "create room: {body}");
        body["room"]["id"].as_str().expect("room id").to_owned()
    }

    /// `admin` invites `user` with `role`, and `user` accepts.
    pub async fn add_member(&self, room: &str, admin: &User, user: &User, role: &str) {
        let (status, body) = self
            .call(
                "POST",
                &format!("/api/v1/rooms/{room}/invites"),
                Some(&admin.token),
                Some(json!({"role": role})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "invite: {body}");
        let code = body["code"].as_str().expect("invite code");
        let (status, body) = self
            .call(
                "POST",
                &format!("/api/v1/invites/{code}/accept"),
                Some(&user.token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "accept: {body}");
    }

    pub async fn history(&self, user: &User, room: &str, query: &str) -> Value {
        let (status, body) = self
            .call(
                "GET",
                &format!("/api/v1/rooms/{room}/messages?{query}"),
                Some(&user.token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "history: {body}");
        body
    }
}

pub type RawWs = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    backlog: VecDeque<Value>,
    next_id: u64,
}

impl Ws {
    pub async fn connect(ws_url: &str, token: &str) -> Ws {
        let url = format!("{ws_url}?token={token}");
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the WebSocket upgrade succeeds");
        Ws {
            stream,
            backlog: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Connects and also returns the node that took the socket (`x-cochat-node`).
    pub async fn connect_with_node(ws_url: &str, token: &str) -> (Ws, String) {
        let url = format!("{ws_url}?token={token}");
        let (stream, response) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the WebSocket upgrade succeeds");
        let node = response
            .headers()
            .get("x-cochat-node")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?")
            .to_owned();
        (
            Ws {
                stream,
                backlog: VecDeque::new(),
                next_id: 0,
            },
            node,
        )
    }

    pub async fn send_text(&mut self, text: String) {
        self.stream
            .send(Message::text(text))
            .await
            .expect("the socket accepts a frame");
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.stream
            .send(Message::binary(bytes))
            .await
            .expect("the socket accepts a frame");
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(frame.to_string()).await;
    }

    /// The next JSON frame from the socket (not the backlog); `None` once the socket closed.
    async fn read_frame(&mut self) -> Option<Value> {
        loop {
            let next = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a frame arrives in time");
            match next {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("server frames are JSON"))
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue, // ping / pong
            }
        }
    }

    /// The next frame, backlog first.
    pub async fn recv(&mut self) -> Value {
        if let Some(frame) = self.backlog.pop_front() {
            return frame;
        }
        self.read_frame().await.expect("the socket is still open")
    }

    /// The first frame (backlog first) that `matches`; others stay in the backlog, in order.
    pub async fn recv_until(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.backlog.iter().position(&matches) {
            return self.backlog.remove(at).expect("position is in range");
        }
        loop {
            let frame = self.read_frame().await.expect("the socket is still open");
            if matches(&frame) {
                return frame;
            }
            self.backlog.push_back(frame);
        }
    }

    /// Waits for a frame like `recv_until` but leaves it to be read again.
    pub async fn peek_until(&mut self, matches: impl Fn(&Value) -> bool) -> Value {
        if let Some(at) = self.backlog.iter().position(&matches) {
            return self.backlog[at].clone();
        }
        loop {
            let frame = self.read_frame().await.expect("the socket is still open");
            self.backlog.push_back(frame.clone());
            if matches(&frame) {
                return frame;
            }
        }
    }

    /// Sends `frame` with a fresh `id` and returns the frame answering it (`reply_to`).
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        frame["id"] = json!(id);
        self.send(frame).await;
        self.recv_until(|answer| answer["reply_to"] == json!(id))
            .await
    }

    pub async fn subscribe(&mut self, room: &str, since_seq: Option<i64>) -> Value {
        let mut frame = json!({"type": "subscribe", "room": room});
        if let Some(since) = since_seq {
            frame["since_seq"] = json!(since);
        }
        let answer = self.request(frame).await;
        assert_eq!(answer["type"], "subscribed", "subscribe answer: {answer}");
        answer
    }

    pub async fn send_message(&mut self, room: &str, client_msg_id: &str, text: &str) -> Value {
        self.request(
            json!({"type": "send", "room": room, "client_msg_id": client_msg_id, "text": text}),
        )
        .await
    }

    /// The next `n` durable events of `room`, in arrival order.
    pub async fn events(&mut self, room: &str, n: usize) -> Vec<Value> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            let frame = self
                .recv_until(|f| f["type"] == "event" && f["room"] == room)
                .await;
            events.push(frame);
        }
        events
    }

    /// Waits for the server to close the socket and returns the close code.
    pub async fn closed(&mut self) -> Option<CloseCode> {
        loop {
            let next = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("the socket closes in time");
            match next {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Nothing else arrives within `wait` (frames already in the backlog count as arrived).
    pub async fn assert_quiet(&mut self, wait: Duration, what: impl Fn(&Value) -> bool) {
        assert!(
            !self.backlog.iter().any(&what),
            "unexpected frame in backlog: {:?}",
            self.backlog
        );
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(wait, self.stream.next()).await
        {
            let frame: Value = serde_json::from_str(&text).expect("server frames are JSON");
            assert!(!what(&frame), "unexpected frame: {frame}");
            self.backlog.push_back(frame);
        }
    }
}

impl Ws {
    /// The next frame from the backlog or one already in flight, without waiting long; `None`
    /// when nothing more comes (or the socket is gone).
    pub async fn try_recv_buffered(&mut self) -> Option<Value> {
        if let Some(frame) = self.backlog.pop_front() {
            return Some(frame);
        }
        match tokio::time::timeout(Duration::from_millis(300), self.stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(&text).ok(),
            Ok(Some(Ok(_))) => Box::pin(self.try_recv_buffered()).await,
            _ => None,
        }
    }
}
