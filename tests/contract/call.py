import requests

url = "https://your-domain/api/call.php"
headers = {"Content-Type": "application/json", "X-API-Key": "your-api-key-here"}
data = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Hello!"}]}
response = requests.post(url, headers=headers, json=data)
print(response.json())
