"""A bare Flask app, served like the service, as the framework ceiling of bench/api.py."""

from flask import Flask, jsonify

app = Flask(__name__)


@app.get("/livez")
def livez():
    return jsonify({"status": "pass"})


@app.get("/flows/<flow_id>")
def flow(flow_id: str):
    return jsonify({"data": {"id": flow_id, "name": "ceiling", "status": "inactive"}})
