"""A real MJPEG-over-HTTP stream server for the stream tests (OpenCV's FFmpeg backend reads it like an IP camera):
``python mjpeg_server.py PORT`` serves 64x48 JPEG frames every 50 ms until it is killed."""
import io
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def jpeg(i):
    a = np.full((48, 64, 3), (i * 10) % 255, np.uint8)
    b = io.BytesIO(); Image.fromarray(a).save(b, format="JPEG"); return b.getvalue()
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        try:
            while True:
                data = jpeg(i)
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data + b"\r\n")
                i += 1; time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
