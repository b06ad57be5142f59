//! A TCP proxy on 127.0.0.1 that can hold traffic: while it holds, nothing crosses it in
//! either direction (bytes wait in socket buffers, as they do in a partition that TCP
//! rides out); once released, everything held goes through, in order. A side that closed
//! meanwhile is closed on the other side after what it sent before closing.

#![allow(dead_code)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct TcpProxy {
    pub port: u16,
    held: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forwards connections on a free loopback port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let port = listener.local_addr().unwrap().port();
        let (held, watch_rx) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, watch_rx.clone()));
                tokio::spawn(pipe(sr, cw, watch_rx.clone()));
            }
        });
        TcpProxy { port, held, accept }
    }

    /// `redis://127.0.0.1:<port>/0`: a Redis URL through the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// From now on nothing goes through.
    pub fn hold(&self) {
        let _ = self.held.send(true);
    }

    /// Everything held goes through, and what comes next.
    pub fn release(&self) {
        let _ = self.held.send(false);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn released(held: &mut watch::Receiver<bool>) {
    let _ = held.wait_for(|h| !*h).await;
}

async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut held: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        released(&mut held).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read just as the hold began: it waits too.
        released(&mut held).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
