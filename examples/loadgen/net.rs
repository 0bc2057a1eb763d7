//! Connections: the loopback-only target, WebSocket clients (optionally from a chosen source
//! address), a tiny keep-alive HTTP/1.1 client, and topic creation and deletion over REST.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::wire::{self, Incoming};
use crate::Result;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a connect plus handshake plus subscribe may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Bytes read from a socket at a time. tungstenite zero-fills this much before every read
/// (64 KiB of memset per read was 16 % of loadgen's CPU in `fanout`), and 4 KiB still holds
/// about 20 events; it also keeps 10,000 idle connections cheap.
const READ_BUFFER: usize = 4 * 1024;
/// Encoded frames collected before a write; a flush sends the rest.
const WRITE_BUFFER: usize = 16 * 1024;

/// The server: an address in 127.0.0.0/8. Anything else is refused.
#[derive(Clone, Debug)]
pub struct Target {
    /// Always IPv4 loopback.
    pub addr: SocketAddr,
}

impl Target {
    /// `http://HOST:PORT` or `ws://HOST:PORT` (a path is ignored); HOST must be `localhost` or
    /// an address in 127.0.0.0/8.
    pub fn parse(url: &str) -> Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("ws://"))
            .ok_or_else(|| format!("--url {url:?} must start with http:// or ws://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| format!("--url {url:?} needs an explicit port"))?;
        let port: u16 = port
            .parse()
            .map_err(|e| format!("bad port in {url:?}: {e}"))?;
        let ip: Ipv4Addr = match host {
            "localhost" => Ipv4Addr::LOCALHOST,
            _ => host
                .parse()
                .map_err(|e| format!("bad host in {url:?} (an IPv4 address is needed): {e}"))?,
        };
        if !ip.is_loopback() {
            return Err(format!("refusing {ip}: loadgen only connects to 127.0.0.0/8").into());
        }
        Ok(Target {
            addr: SocketAddr::new(ip.into(), port),
        })
    }
}

/// Opens a TCP connection to the server, from `source` (a loopback address) when given.
pub async fn connect_tcp(target: &Target, source: Option<Ipv4Addr>) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(source) = source {
        if !source.is_loopback() {
            return Err(format!("source address {source} is not in 127.0.0.0/8").into());
        }
        socket.bind(SocketAddr::new(source.into(), 0))?;
    }
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects and completes the WebSocket handshake on `/ws`.
pub async fn connect_ws(target: &Target, source: Option<Ipv4Addr>) -> Result<Ws> {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER);
    let setup = async {
        let stream = connect_tcp(target, source).await?;
        let url = format!("ws://{}/ws", target.addr);
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
        Ok::<_, crate::Error>(ws)
    };
    tokio::time::timeout(SETUP_TIMEOUT, setup)
        .await
        .map_err(|_| "WebSocket connect timed out")?
}

/// Connects and subscribes to `topic`, returning once the subscription is acknowledged.
pub async fn subscriber(
    target: &Target,
    source: Option<Ipv4Addr>,
    topic: &str,
    client_id: &str,
) -> Result<Ws> {
    let mut ws = connect_ws(target, source).await?;
    ws.send(Message::text(wire::subscribe(topic, client_id)))
        .await?;
    let acked = async {
        while let Some(message) = ws.next().await {
            if let Message::Text(text) = message? {
                match wire::classify(&text) {
                    Incoming::Ack { .. } => return Ok(()),
                    Incoming::Error { code, .. } => {
                        return Err(format!("subscribe to {topic} refused: {code}").into())
                    }
                    _ => {}
                }
            }
        }
        Err::<(), crate::Error>("connection closed before the subscribe ack".into())
    };
    tokio::time::timeout(SETUP_TIMEOUT, acked)
        .await
        .map_err(|_| "no subscribe ack in time")??;
    Ok(ws)
}

/// Why [`read_until_stopped`] returned.
pub enum Ending {
    /// The stop signal came (or its sender went away).
    Stopped,
    /// The server closed the connection, with this close code if it sent one.
    Closed(Option<u16>),
    Failed(WsError),
}

/// Hands every text frame to `on_text` until `stop` fires or the connection ends. Ping frames
/// are answered by tungstenite itself.
pub async fn read_until_stopped<S>(
    stream: &mut S,
    stop: &mut watch::Receiver<bool>,
    mut on_text: impl FnMut(&str),
) -> Ending
where
    S: futures_util::Stream<Item = std::result::Result<Message, WsError>> + Unpin,
{
    if *stop.borrow_and_update() {
        return Ending::Stopped;
    }
    loop {
        // Biased: frames already buffered are handled before the stop is looked at, and the
        // stop future is only polled (and registered) when the socket has nothing to give.
        let next = tokio::select! {
            biased;
            next = stream.next() => next,
            _ = stop.changed() => return Ending::Stopped,
        };
        match next {
            Some(Ok(Message::Text(text))) => on_text(&text),
            Some(Ok(Message::Close(frame))) => {
                return Ending::Closed(frame.map(|f| u16::from(f.code)))
            }
            Some(Ok(_)) => {}
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => {
                return Ending::Closed(None)
            }
            Some(Err(error)) => return Ending::Failed(error),
        }
    }
}

/// A keep-alive HTTP/1.1 connection that sends one request at a time.
pub struct HttpConn {
    target: Target,
    stream: Option<BufReader<TcpStream>>,
    /// Times the server closed the connection and it had to be opened again.
    pub reconnects: u64,
}

impl HttpConn {
    pub fn new(target: &Target) -> HttpConn {
        HttpConn {
            target: target.clone(),
            stream: None,
            reconnects: 0,
        }
    }

    /// Sends a request and reads the whole response: its status and body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, Vec<u8>)> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = connect_tcp(&self.target, None).await?;
                self.stream.insert(BufReader::new(stream))
            }
        };
        let body = body.unwrap_or("");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.target.addr,
            body.len()
        );
        stream.get_mut().write_all(head.as_bytes()).await?;
        let response = read_response(stream).await;
        match &response {
            Ok((_, _, keep_alive)) if *keep_alive => {}
            _ => {
                self.stream = None;
                self.reconnects += 1;
            }
        }
        response.map(|(status, body, _)| (status, body))
    }
}

/// Reads one response: status, body (by `Content-Length` or chunked) and whether the
/// connection stays open.
async fn read_response(stream: &mut BufReader<TcpStream>) -> Result<(u16, Vec<u8>, bool)> {
    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err("connection closed before a response".into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let (mut length, mut chunked, mut keep_alive) = (None, false, true);
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err("connection closed in the headers".into());
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.parse::<usize>()?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => keep_alive = !value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)?;
            let start = body.len();
            body.resize(start + size, 0);
            stream.read_exact(&mut body[start..]).await?;
            line.clear();
            stream.read_line(&mut line).await?;
            if size == 0 {
                break;
            }
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        stream.read_exact(&mut body).await?;
    } else {
        keep_alive = false;
        stream.read_to_end(&mut body).await?;
    }
    Ok((status, body, keep_alive))
}

/// Creates the topics over REST; every one must be new (`201`).
pub async fn create_topics(target: &Target, names: &[String]) -> Result<()> {
    let mut http = HttpConn::new(target);
    for name in names {
        let (status, body) = http
            .request("POST", "/topics", Some(&wire::topic_body(name)))
            .await?;
        if status != 201 {
            let body = String::from_utf8_lossy(&body);
            return Err(format!("POST /topics {name}: {status} {body}").into());
        }
    }
    Ok(())
}

/// Deletes the topics, best effort: a failure is reported on stderr only.
pub async fn delete_topics(target: &Target, names: &[String]) {
    let mut http = HttpConn::new(target);
    for name in names {
        match http
            .request("DELETE", &format!("/topics/{name}"), None)
            .await
        {
            Ok((200 | 404, _)) => {}
            Ok((status, _)) => crate::progress!("DELETE /topics/{name}: {status}"),
            Err(error) => crate::progress!("DELETE /topics/{name}: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Target;

    #[test]
    fn only_loopback_targets_are_accepted() {
        for ok in [
            "http://127.0.0.1:8000",
            "ws://localhost:1/ws",
            "http://127.9.8.7:80/x",
        ] {
            assert!(Target::parse(ok).is_ok(), "{ok}");
        }
        for refused in [
            "http://10.0.0.1:8000",
            "http://192.168.1.2:80",
            "http://example.com:80",
            "http://[::1]:80",
            "http://127.0.0.1",
            "https://127.0.0.1:443",
        ] {
            assert!(Target::parse(refused).is_err(), "{refused}");
        }
    }
}
