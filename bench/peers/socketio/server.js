// The Socket.IO peer of `unhidra-bench fanout`: one process, WebSocket transport only, no
// compression, no client bundle. Usage: node server.js PORT (listens on 127.0.0.1 only).
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const port = Number.parseInt(process.argv[2], 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  process.stderr.write("usage: node server.js PORT\n");
  process.exit(2);
}

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  perMessageDeflate: false,
});

io.on("connection", (socket) => {
  socket.on("join", (room, ack) => {
    socket.join(room);
    if (typeof ack === "function") ack();
  });
  socket.on("send", (room, body, ack) => {
    io.to(room).emit("message", body);
    if (typeof ack === "function") ack();
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  process.stdout.write(`ready on 127.0.0.1:${port}\n`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
