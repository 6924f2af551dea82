"""The NATS side of opmasd: one connection, what travels over it, and the §5 JSON it speaks.

- connection.py: NatsBus, the connection (connect forever, reconnect, registrations, close,
  stats) and the AgentBus (base.py) the manager talks to, built from the parts below;
- intake.py: agent.status / agent.metrics decoded and handed to the manager's handlers;
- agent_commands.py: request/reply to one agent on {p}.{id}.command;
- manager_service.py: the manager's own subjects, served as the micro service "opmasd";
- micro.py, serving.py, registration.py: micro services, concurrent request handlers, and
  what is set up on connect and taken down at stop;
- codec.py, subjects.py, burst.py, urls.py: the JSON, the subject names, bounded logging of
  bad input, and server URLs; embedded.py: the nats-server opmasd runs when none is given.
"""
