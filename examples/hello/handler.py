def handle(req, ctx):
    return {"hello": req.query.get("name", "world")}
