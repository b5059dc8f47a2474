// placeholder: the browser library lands with issue 3
