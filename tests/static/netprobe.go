// netprobe: a static Go program (CGO_ENABLED=0, so no LD_PRELOAD shim reaches it) that the
// kernel-session tests run as a server and as a client.
//
//	netprobe serve tcp|udp PORT NAME   bind PORT on 127.0.0.1, print "listening ACTUAL", answer NAME
//	netprobe get PORT                  HTTP GET 127.0.0.1:PORT, print "BODY peer PEERPORT"
//	netprobe udp-connected PORT        send over a connected UDP socket, print "REPLY from PORT"
//	netprobe udp-unconnected PORT      send with sendto/recvfrom, print "REPLY from PORT"
package main

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"time"
)

func fail(err error) {
	fmt.Println("error", err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: netprobe serve tcp|udp PORT NAME | get PORT | udp-connected PORT | udp-unconnected PORT")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2], os.Args[3], os.Args[4])
	case "get":
		get(os.Args[2])
	case "udp-connected":
		udpConnected(os.Args[2])
	case "udp-unconnected":
		udpUnconnected(os.Args[2])
	}
}

func serve(proto, port, name string) {
	if proto == "udp" {
		conn, err := net.ListenPacket("udp4", "127.0.0.1:"+port)
		if err != nil {
			fail(err)
		}
		fmt.Println("listening", conn.LocalAddr().(*net.UDPAddr).Port)
		buf := make([]byte, 1500)
		for {
			n, from, err := conn.ReadFrom(buf)
			if err != nil {
				fail(err)
			}
			_ = n
			conn.WriteTo([]byte(name), from)
		}
	}
	listener, err := net.Listen("tcp4", "127.0.0.1:"+port)
	if err != nil {
		fail(err)
	}
	fmt.Println("listening", listener.Addr().(*net.TCPAddr).Port)
	http.Serve(listener, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, name)
	}))
}

func get(port string) {
	conn, err := net.DialTimeout("tcp4", "127.0.0.1:"+port, 3*time.Second)
	if err != nil {
		fail(err)
	}
	peer := conn.RemoteAddr().(*net.TCPAddr).Port
	fmt.Fprintf(conn, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	reply, err := io.ReadAll(conn)
	if err != nil {
		fail(err)
	}
	body := string(reply)
	for i := 0; i+3 < len(body); i++ {
		if body[i:i+4] == "\r\n\r\n" {
			body = body[i+4:]
			break
		}
	}
	fmt.Println(body, "peer", peer)
}

func udpConnected(port string) {
	p, _ := strconv.Atoi(port)
	conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p})
	if err != nil {
		fail(err)
	}
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := conn.Write([]byte("hello")); err != nil {
		fail(err)
	}
	buf := make([]byte, 1500)
	n, err := conn.Read(buf)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(buf[:n]), "from", conn.RemoteAddr().(*net.UDPAddr).Port)
}

func udpUnconnected(port string) {
	p, _ := strconv.Atoi(port)
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		fail(err)
	}
	conn.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := conn.WriteTo([]byte("hello"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p}); err != nil {
		fail(err)
	}
	buf := make([]byte, 1500)
	n, from, err := conn.ReadFromUDP(buf)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(buf[:n]), "from", from.Port)
}
