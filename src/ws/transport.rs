//! The WebSocket transport. actix-http hands every WebSocket upgrade request here (its HTTP/1
//! "upgrade" service) together with the TCP stream; after the `101` the socket runs on the bare
//! stream, outside the HTTP/1 dispatcher.
//!
//! Why: a connection left in the dispatcher keeps an 8 KiB read and an 8 KiB write buffer for its
//! whole life (16 KiB of the ~20 KiB each idle connection allocated, measured with heaptrack),
//! and every outgoing frame is copied once more into that write buffer. Here an idle connection
//! holds no buffer: a read buffer exists only while bytes are read, and the bytes the session's
//! `WebsocketContext` encodes are written as they are. The session actor and its
//! `WebsocketContext` (actix-web-actors) are the same as on the dispatcher path.

use std::io;
use std::pin::pin;
use std::time::Duration;

use actix_codec::{Framed, FramedParts};
use actix_http::body::{BodySize, MessageBody};
use actix_http::error::PayloadError;
use actix_http::{h1, ws as codec, ConnectionType, Request};
use actix_service::{fn_factory, fn_service, ServiceFactory};
use actix_web::{web, ResponseError};
use actix_web_actors::ws;
use bytes::{Bytes, BytesMut};
use futures_util::{stream, SinkExt, Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

use super::{authorize, handshake_error, Session, WS_PATH};
use crate::error::ApiError;
use crate::state::AppState;

/// Bytes read from the socket at a time. Client frames are small; a larger one arrives over
/// several reads and is assembled by the WebSocket decoder.
const READ_CHUNK: usize = 4096;

type Io = Framed<TcpStream, h1::Codec>;

/// The service actix-http calls with each WebSocket upgrade request and its connection.
pub fn upgrade_service(
    state: web::Data<AppState>,
) -> impl ServiceFactory<
    (Request, Io),
    Config = (),
    Response = (),
    Error = actix_web::Error,
    InitError = (),
> {
    fn_factory(move || {
        let state = state.clone();
        async move {
            Ok::<_, ()>(fn_service(move |(req, framed): (Request, Io)| {
                serve(state.clone(), req, framed)
            }))
        }
    })
}

/// Answers the upgrade: a `101`, or the same JSON error as the HTTP route. After a `101` the
/// socket goes on in a task of its own and this returns, so that actix-http's dispatcher (some
/// 2 KiB with its timers and codec) is freed instead of waiting as long as the socket lives.
/// (Such sockets are not counted by the server's graceful stop; `drain` closes them first.)
async fn serve(
    state: web::Data<AppState>,
    req: Request,
    mut framed: Io,
) -> Result<(), actix_web::Error> {
    let accepted = accept(&state, &req);
    // The request's header values are slices of the dispatcher's 8 KiB read buffer: keeping the
    // request would keep that buffer for the life of the socket.
    drop(req);
    let (session, response) = match accepted {
        Ok(accepted) => accepted,
        Err(error) => return refuse(framed, &error).await,
    };
    framed
        .send(h1::Message::Item((response, BodySize::None)))
        .await?;
    // Only the stream and any bytes the client sent after its request (frames sent before our
    // 101 reached it) go on; the dispatcher's buffers are released here.
    let FramedParts { io, read_buf, .. } = framed.into_parts();
    let early = Bytes::copy_from_slice(&read_buf);
    drop(read_buf);
    actix_web::rt::spawn(run(state, session, io, early));
    Ok(())
}

/// Runs `session` on the socket until either side closes it.
async fn run(state: web::Data<AppState>, session: Session, io: TcpStream, early: Bytes) {
    let (reader, mut writer) = io.into_split();
    let limits = &state.settings.limits;
    // Frames up to 4x the limit are read and refused with an error frame; beyond that the codec
    // gives up and the socket closes with 1009.
    let hard_cap = limits.max_frame_bytes.saturating_mul(4).max(1024);
    let codec = codec::Codec::new().max_size(hard_cap);
    // A peer that stops reading while we have frames for it is given the client timeout to take
    // them; meanwhile the session is not polled, its room stream lags, and it would be cut off
    // as a slow consumer anyway.
    let write_timeout = state.settings.client_timeout.max(Duration::from_secs(1));
    drop(state);
    let mut output = pin!(ws::WebsocketContext::with_codec(
        session,
        frames_in(early, reader),
        codec
    ));
    while let Some(bytes) = output.next().await {
        let Ok(bytes) = bytes else {
            tracing::debug!("websocket frame could not be encoded");
            return;
        };
        match tokio::time::timeout(write_timeout, writer.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, "websocket write failed");
                return;
            }
            Err(_) => {
                tracing::debug!("websocket write timed out");
                return;
            }
        }
    }
    let _ = writer.shutdown().await;
}

/// The session and the `101` for a good request; the error to answer with otherwise.
fn accept(
    state: &web::Data<AppState>,
    req: &Request,
) -> Result<(Session, actix_http::Response<()>), ApiError> {
    if req.path() != WS_PATH {
        return Err(ApiError::new(
            cochat_actors::error::ErrorCode::NotFound,
            format!("no WebSocket endpoint at {}", req.path()),
        ));
    }
    let user = authorize(state, &req.head().headers, req.uri().query())?;
    let mut response = codec::handshake(req.head()).map_err(handshake_error)?;
    // Which node took the socket: for operators behind a load balancer, and for cluster tests.
    response.insert_header(("x-cochat-node", state.settings.node_id.as_str()));
    let session = Session::new(user, state.clone().into_inner());
    Ok((session, response.finish().drop_body()))
}

/// Writes `error` as a complete HTTP response (status and JSON body) and closes the connection.
async fn refuse(mut framed: Io, error: &ApiError) -> Result<(), actix_web::Error> {
    let (head, body) = actix_http::Response::from(error.error_response()).into_parts();
    let body = body.try_into_bytes().unwrap_or_default();
    let mut head = head;
    head.head_mut().set_connection_type(ConnectionType::Close);
    framed
        .send(h1::Message::Item((
            head,
            BodySize::Sized(body.len() as u64),
        )))
        .await?;
    framed.send(h1::Message::Chunk(Some(body))).await?;
    framed.send(h1::Message::Chunk(None)).await?;
    Ok(())
}

/// The socket's bytes as a stream of chunks: `early` first, then each read. A buffer is allocated
/// only once the socket is readable and is handed on whole, so an idle connection holds none.
fn frames_in(
    early: Bytes,
    reader: OwnedReadHalf,
) -> impl Stream<Item = Result<Bytes, PayloadError>> {
    let early = (!early.is_empty()).then_some(Ok(early));
    let reads = stream::unfold(Some(reader), |reader| async move {
        let reader = reader?;
        loop {
            if let Err(error) = reader.readable().await {
                return Some((Err(PayloadError::Io(error)), None));
            }
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            match reader.try_read_buf(&mut buf) {
                Ok(0) => return None,
                Ok(_) => return Some((Ok(buf.freeze()), Some(reader))),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Some((Err(PayloadError::Io(error)), None)),
            }
        }
    });
    stream::iter(early).chain(reads)
}
