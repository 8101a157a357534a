// The peer for scripts/bench.sh: a Socket.IO server with its Redis adapter, implementing the
// same minimal room semantics the benchmark uses on cochat:
//   emit("join", room, ack)            -> socket joins the room, ack({ok: true})
//   emit("send", {room, text}, ack)    -> io.to(room).emit("message", {room, text}), ack({ok: true})
// Environment: PORT (default 3000), HOST (127.0.0.1), REDIS_URL (unset: the in-memory adapter).
// Prints "listening <port>" when ready and "pid <pid> rss <bytes>" on SIGUSR2.
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || "127.0.0.1";

async function main() {
  const httpServer = http.createServer((req, res) => {
    if (req.url === "/readyz") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok");
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
    pingInterval: 25000,
    pingTimeout: 20000,
  });
  if (process.env.REDIS_URL) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pubClient = createClient({ url: process.env.REDIS_URL });
    const subClient = pubClient.duplicate();
    pubClient.on("error", (e) => console.error("redis pub:", e.message));
    subClient.on("error", (e) => console.error("redis sub:", e.message));
    await Promise.all([pubClient.connect(), subClient.connect()]);
    io.adapter(createAdapter(pubClient, subClient));
  }
  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      if (typeof room !== "string" || room.length === 0) {
        if (typeof ack === "function") ack({ ok: false, error: "room must be a string" });
        return;
      }
      socket.join(room);
      if (typeof ack === "function") ack({ ok: true });
    });
    socket.on("send", (msg, ack) => {
      if (!msg || typeof msg.room !== "string" || typeof msg.text !== "string") {
        if (typeof ack === "function") ack({ ok: false, error: "room and text are required" });
        return;
      }
      io.to(msg.room).emit("message", { room: msg.room, text: msg.text });
      if (typeof ack === "function") ack({ ok: true });
    });
  });
  httpServer.listen(port, host, () => console.log(`listening ${port}`));
  const stop = () => io.close(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
